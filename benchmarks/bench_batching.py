"""Static against continuous batching, plain or speculative, same prompts, same run: tokens/s, slot utilisation, tau.

    python benchmarks/prompt_sets.py --out runs/bench256 --chat 256 --humaneval 0
    python benchmarks/bench_batching.py --prompts runs/bench256/sharegpt_heldout.jsonl --max-new-tokens 256 \\
        --configs static:8,continuous:8,static:16,continuous:16,spec-static:8,spec-continuous:8

Each config is one `infer.py --batching MODE --batch-size B` run, `--draft none` for plain modes and `--draft DRAFT
--draft-top-k/--draft-depth/--draft-tokens TREE` for spec-* modes (tokens/s excludes compilation, includes prefill
and every admission). Prints a markdown table, then one JSON list.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--questions", type=int, default=None, help="first N requests (default all)")
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--configs", default="static:16,continuous:16",
                  help="MODE:BATCH,...; MODE static, continuous, spec-static or spec-continuous, continuous ones "
                       "optionally @shortest or @longest (admission order; infer.py's default: longest)")
  ap.add_argument("--temperature", default="0")
  ap.add_argument("--draft", default="auto", help="draft of the spec-* configs (auto: the shipped one)")
  ap.add_argument("--tree", default="1,3,3", help="TOP_K,DEPTH,TOKENS of the spec-* configs")
  args = ap.parse_args(argv)
  top_k, depth, tokens = args.tree.split(",")
  import infer

  lines = pathlib.Path(args.prompts).read_text().splitlines()[:args.questions]
  rows, outputs = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    prompts = pathlib.Path(tmp) / "q.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    for item in args.configs.split(","):
      mode, batch = item.split(":")
      mode, _, order = mode.partition("@")  # continuous@shortest: admit the shortest prompts first
      out = pathlib.Path(tmp) / f"{mode}{order}{batch}.jsonl"
      draft = ["--draft", "none"] if not mode.startswith("spec-") else [
          "--draft", args.draft, "--draft-top-k", top_k, "--draft-depth", depth, "--draft-tokens", tokens]
      with contextlib.redirect_stdout(io.StringIO()):
        s = infer.main(["--prompts", str(prompts), *draft, "--batching", mode.removeprefix("spec-"),
                        "--batch-size", batch, "--admit-order", order or "longest",
                        "--temperature", args.temperature, "--max-new-tokens", str(args.max_new_tokens),
                        "--no-progress", "--output", str(out)])
      outputs[item] = [json.loads(x)["token_ids"] for x in out.read_text().splitlines()]
      row = {"mode": mode + ("@" + order if order else ""), "batch": int(batch), "requests": s["requests"],
             "tokens": s["tokens"],
             "tokens_per_s": s["tokens_per_s"], "utilisation": s.get("utilisation"), "tau": s.get("tau"),
             "generate_seconds": s["generate_seconds"], "compile_s": s.get("compile_s"),
             "same_tokens_as_first": outputs[item] == next(iter(outputs.values()))}
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  base = {r["batch"]: r["tokens_per_s"] for r in rows if r["mode"] == "static"}
  print("| batching | B | requests | tokens | tokens/s | vs plain static same B | utilisation | tau | same tokens |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ratio = f"{r['tokens_per_s'] / base[r['batch']]:.2f}x" if r["batch"] in base else "-"
    print(f"| {r['mode']} | {r['batch']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.1f} | {ratio} | "
          f"{r['utilisation']} | {r['tau']} | {'yes' if r['same_tokens_as_first'] else 'NO'} |")
  print(json.dumps(rows))
  return rows


if __name__ == "__main__":
  main()
