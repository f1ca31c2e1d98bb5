"""Decode step with attention keys-first (few queries) against queries-first, same process, interleaved.

    python benchmarks/attention_layout.py    # B 16 S 512, B 32 S 1024, B 1 S 512; best and median of 4
"""
import sys, time; import pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import numpy as np, jax, jax.numpy as jnp
from eagle3_jax.nn import attention
from eagle3_jax.decode.autotree import costs as C
from eagle3_jax.target import load
cfg, params = load.load_target(None, dtype=jnp.float32)
res = {}
for B, S in ((16, 512), (32, 1024), (1, 512)):
  keep = {}
  for few in (0, 64):
    attention.FEW_QUERIES = few
    k = []; C.decode_step_cost(params, cfg, batch=B, cache_len=S, n=4, first=[], keep=k); keep[few] = k[0]
  ts = {few: [] for few in keep}
  for _ in range(4):
    for few, f in keep.items(): ts[few].append(f())
  print(f"B={B} S={S}: keys-last {1e3*min(ts[0]):.1f} ms (median {1e3*np.median(ts[0]):.1f}), keys-first {1e3*min(ts[64]):.1f} ms (median {1e3*np.median(ts[64]):.1f})", flush=True)
