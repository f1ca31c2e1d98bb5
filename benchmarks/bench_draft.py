"""A trained draft on question files: tau and speedup over same-engine vanilla decoding, per prompt set, tree,
batch size and temperature, through infer.py (--compare: vanilla and speculative in the same process and run).

    python benchmarks/prompt_sets.py --out runs/bench            # held-out ShareGPT + HumanEval question files
    python benchmarks/bench_draft.py --draft eagle3_jax/drafts/smollm2_135m_instruct \\
        --sets runs/bench/sharegpt_heldout.jsonl,runs/bench/humaneval.jsonl --questions 10 --max-new-tokens 96 \\
        --trees 1x3x3,4x4x16 --batch-sizes 1,4 --temperatures 0,1

Compilation is excluded (infer's tokens/s counts generation time only), prefill included, EOS respected. Prints a
markdown table and, as the last line, one JSON list of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--draft", required=True)
  ap.add_argument("--sets", required=True, help="comma list of question files")
  ap.add_argument("--questions", type=int, default=10, help="first N questions of each set")
  ap.add_argument("--max-new-tokens", type=int, default=96)
  ap.add_argument("--trees", default="1x3x3")
  ap.add_argument("--batch-sizes", default="1")
  ap.add_argument("--temperatures", default="0")
  args = ap.parse_args(argv)
  import infer

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for qset, tree, batch, temp in itertools.product(args.sets.split(","), args.trees.split(","),
                                                     args.batch_sizes.split(","), args.temperatures.split(",")):
      lines = pathlib.Path(qset).read_text().splitlines()[:args.questions]
      prompts = pathlib.Path(tmp) / "q.jsonl"
      prompts.write_text("\n".join(lines) + "\n")
      k, d, n = tree.split("x")
      with contextlib.redirect_stdout(io.StringIO()):
        s = infer.main(["--prompts", str(prompts), "--draft", args.draft, "--draft-top-k", k, "--draft-depth", d,
                        "--draft-tokens", n, "--batch-size", batch, "--temperature", temp, "--compare",
                        "--max-new-tokens", str(args.max_new_tokens), "--no-progress", "--output",
                        str(pathlib.Path(tmp) / "out.jsonl")])
      row = {"set": pathlib.Path(qset).stem, "questions": len(lines), "tree": tree, "batch": int(batch),
             "temperature": float(temp), "tau": s["tau"], "tokens_per_s": s["tokens_per_s"],
             "vanilla_tokens_per_s": s["vanilla_tokens_per_s"], "speedup": s["speedup"],
             "identical_to_vanilla": s.get("identical_to_vanilla")}
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  print("| set | tree | batch | T | tau | tokens/s | vanilla tokens/s | speedup | output == vanilla |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    same = "" if r["identical_to_vanilla"] is None else ("yes" if r["identical_to_vanilla"] else "NO")
    print(f"| {r['set']} ({r['questions']}) | {r['tree']} | {r['batch']} | {r['temperature']:g} | {r['tau']:.2f} | "
          f"{r['tokens_per_s']:.1f} | {r['vanilla_tokens_per_s']:.1f} | {r['speedup']:.2f} | {same} |")
  print(json.dumps(rows))
  return rows


if __name__ == "__main__":
  main()
