"""Where a continuous batcher's time goes: every admission, resize and step (or round) chunk of a run timed on its
own, warm runs after a first that compiles, against the autotree calibration's step at the same cache sizes.

    python benchmarks/slot_calls.py --prompts runs/bench/sharegpt_heldout.jsonl --questions 8 --max-new-tokens 64 \\
        --batch 4 --tree 1x3x3          # or --tree none for plain decoding

Each call waits for the work before it and for its own result (the batcher itself never waits between calls), so
the per-call seconds add up to the run; compilation is taken out. BENCHMARKS.md "Tree choice with the tie rule,
layouts kept, longest first" reads these against the model's admit_s, step and round costs.
"""

from __future__ import annotations

import argparse
import collections
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
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--tree", default="none", help="KxDxP (top_k x depth x nodes) with the shipped draft, or none")
  ap.add_argument("--runs", type=int, default=3)
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp

  from eagle3_jax import drafts
  from eagle3_jax.decode import batching, engine, sampling
  from eagle3_jax.decode.autotree import costs
  from eagle3_jax.decode.tree import TreeConfig
  from eagle3_jax.target import hf, load

  jax.config.update("jax_compilation_cache_dir", str(hf.cache_root() / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  cfg, params = load.load_target(None, dtype=jnp.float32)
  rows = [json.loads(line) for line in pathlib.Path(args.prompts).read_text().splitlines()[:args.questions]]
  ids = engine.Engine(None, load.load_tokenizer(None)).encode(
      [{"messages": [{"role": "user", "content": r["turns"][0]}]} for r in rows])
  common = dict(sampling_cfg=sampling.SamplingConfig(), max_new_tokens=args.max_new_tokens, slots=args.batch)
  if args.tree == "none":
    gen = engine.make_generator(params, cfg, **common)
  else:
    k, d, p = (int(x) for x in args.tree.split("x"))
    tcfg, ckpt = engine.load_draft(str(drafts.default_draft_path()), cfg)
    gen = engine.make_generator(params, tcfg, draft_ckpt=ckpt, tree_cfg=TreeConfig(top_k=k, depth=d, total_tokens=p),
                                **common)
  log: list[tuple[str, int, object, float, int]] = []
  call = batching.ContinuousBatcher._call

  def timed(self, kind, S, T, stats, *a, **kw):
    jax.block_until_ready(a)
    c0, t0 = stats["compile_s"], time.perf_counter()
    out = jax.block_until_ready(call(self, kind, S, T, stats, *a, **kw))
    log.append((kind, S, T, time.perf_counter() - t0 - (stats["compile_s"] - c0), int(jax.device_get(out.steps))))
    return out

  batching.ContinuousBatcher._call = timed
  print("prompt lengths", [len(x) for x in ids], "buckets", [engine.bucket_length(len(x)) for x in ids])
  for run in range(args.runs):
    log.clear()
    _, st = gen.run(ids)
    seconds, steps, before = collections.defaultdict(float), collections.defaultdict(int), 0
    for kind, S, T, dt, now in log:
      name = f"{kind} S={S}" + (f" T={T[0]}" if kind == "admit" else f"->{T}" if kind == "resize" else "")
      seconds[name] += dt
      if kind == "steps":
        steps[S] += now - before
      before = now
    extra = f", tau {st['accepted'] / st['rounds']:.2f}" if "rounds" in st else ""
    print(f"run {run}{' (compiles)' if run == 0 else ''}: {st['seconds']:.2f} s, compile {st['compile_s']:.1f} s, "
          f"{st['steps']:.0f} chunk steps{extra}")
    for name, dt in sorted(seconds.items()):
      S = int(name.split("S=")[1].split()[0].split("-")[0])
      per = f" ({dt / steps[S] * 1e3:.1f} ms each of {steps[S]})" if name.startswith("steps") else ""
      print(f"  {name}: {dt:.3f} s{per}")
  for S in sorted({S for kind, S, *_ in log if kind == "steps"}):
    step = costs.decode_step_cost(params, cfg, batch=args.batch, cache_len=S, n=8, first=[])
    print(f"calibration's plain step at {S} slots: {step * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
