"""A continuous batcher run three times on the same requests in one process: run 0 pays compilation (outside its
timed seconds) and any first-run cost, runs 1-2 are warm; admissions and loop chunks are timed separately there.

    python benchmarks/batcher_warm.py none|KxDxP [--prompts FILE] [--questions 8] [--batch-size 4]
"""
import argparse
import collections
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jax, jax.numpy as jnp
import infer
from eagle3_jax.decode import engine, batching, sampling
from eagle3_jax.target import load
cfg, params = load.load_target(None, dtype=jnp.float32)
tok = load.load_tokenizer(None)
ap = argparse.ArgumentParser()
ap.add_argument("shape")
ap.add_argument("--prompts", default="runs/bench/sharegpt_heldout.jsonl")
ap.add_argument("--questions", type=int, default=8)
ap.add_argument("--batch-size", type=int, default=4)
args = ap.parse_args()
reqs = infer.read_jsonl(args.prompts)[:args.questions]
first = [{"messages": [{"role": "user", "content": r["turns"][0]}]} if "turns" in r else r for r in reqs]
ids = engine.Engine(None, tok).encode(first)
kw = dict(sampling_cfg=sampling.SamplingConfig(), max_new_tokens=64, stop_ids=engine.stop_ids(tok, None))
shape = args.shape
if shape == "none":
  b = batching.ContinuousBatcher(params, cfg, slots=args.batch_size, **kw)
else:
  from eagle3_jax.decode.tree import TreeConfig
  cfg2, ckpt = engine.load_draft("eagle3_jax/drafts/smollm2_135m_instruct", cfg)
  k, d, p = map(int, shape.split("x"))
  b = engine.make_generator(params, cfg2, draft_ckpt=ckpt, tree_cfg=TreeConfig(top_k=k, depth=d, total_tokens=p), slots=args.batch_size, **kw)
orig = b._call
times = collections.defaultdict(float); counts = collections.Counter()
def timed(kind, S, T, stats, *a, **k):
  key = (kind, S, T); new = key not in b._compiled
  out = orig(kind, S, T, stats, *a, **k)
  if new: return out  # compile + first run: not timed here (first run measured below via warm runs)
  t0 = time.perf_counter(); jax.block_until_ready(out); times[kind] += time.perf_counter() - t0
  return out
for run in range(3):
  times.clear()
  b._call = timed if run else orig
  t0 = time.perf_counter(); res, st = b.run(ids); wall = time.perf_counter() - t0
  print(shape, f"run {run}: seconds {st['seconds']:.2f} (compile {st['compile_s']:.1f}, wall {wall:.1f}) steps {st['steps']:.0f} tokens {st['tokens']:.0f}", {k: round(v, 2) for k, v in times.items()})
