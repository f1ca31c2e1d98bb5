"""The engine's plain static decoding at batch 1, request by request, against the autotree calibration's timed step.

    python benchmarks/engine_vs_calibration.py [--prompts runs/bench/sharegpt_heldout.jsonl] [--questions 8]

Runs each request alone through the engine's static generator with 1 and with 64 new tokens (three passes each; the
first pays first-run work), so prefill and decode steps separate: (t64 - t1) / 63 is the engine's step. Then times
`autotree.costs.decode_step_cost` at the cache lengths the requests use. BENCHMARKS.md "Tree choice with the layout
priced apart": the calibration's step once carried 1/8 of the decode layout (52 ms) and read 20% over the engine's.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", default="runs/bench/sharegpt_heldout.jsonl")
  ap.add_argument("--questions", type=int, default=8)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from eagle3_jax.decode import engine, sampling
  from eagle3_jax.decode.autotree import costs
  from eagle3_jax.target import hf, load

  jax.config.update("jax_compilation_cache_dir", str(hf.cache_root() / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  cfg, params = load.load_target(None, dtype=jnp.float32)
  tok = load.load_tokenizer(None)
  rows = [json.loads(line) for line in pathlib.Path(args.prompts).read_text().splitlines()[:args.questions]]
  ids = engine.Engine(None, tok).encode([{"messages": [{"role": "user", "content": r["turns"][0]}]} for r in rows])
  best = {}
  for M in (1, 64):
    gen = engine.VanillaGenerator(params, cfg, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=M)
    for rep in range(3):
      for i, x in enumerate(ids):
        T = engine.bucket_length(len(x))
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :len(x)] = x
        batch = engine.Batch(tokens=tokens, lengths=np.array([len(x)], np.int32), n_real=1)
        t0 = time.perf_counter()
        out = gen.generate(batch)
        seconds = time.perf_counter() - t0 - out.stats["compile_s"]
        best[M, i] = min(best.get((M, i), float("inf")), seconds)
  print("| request | bucket | 1 token s | 64 tokens s | engine step ms |")
  print("|---|---|---|---|---|")
  for i, x in enumerate(ids):
    print(f"| {i} | {engine.bucket_length(len(x))} | {best[1, i]:.3f} | {best[64, i]:.3f} | "
          f"{(best[64, i] - best[1, i]) / 63 * 1e3:.1f} |")
  for S in sorted({engine.bucket_length(len(x)) + 64 for x in ids}):
    step = costs.decode_step_cost(params, cfg, batch=1, cache_len=S, n=8, first=[])
    print(f"calibration step at {S} cache slots: {step * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
