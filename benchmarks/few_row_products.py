"""XLA:CPU's products of a few rows by SmolLM2-sized weights, under XLA's defaults (YNNPACK fusions) and without
YNNPACK fusions (decode/xla_cpu.py), compiled in one process and timed interleaved; random weights, no model load.

    python benchmarks/few_row_products.py [--rows 1,2,3,4,5,8,16]

Two groups: the 30 layers' seven weight products (106 M parameters, 425 MB of fp32 per pass; each a [M, 576] row
block times a [D, F] matrix, contracted over the weights' major axis) and the output head (49152 x 576, 113 MB),
as [V, D] (the tied embedding, contracted over its minor axis) and as a [D, V] copy. Memory floor at ~20 GB/s:
21 ms and 5.7 ms whatever M.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

L, D, F, KV, V = 30, 576, 1536, 192, 49152
OPTIONS = {"defaults (YNNPACK)": None, "no YNNPACK fusions": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def layers_fn(x, ws):
  for q_w, k_w, v_w, o_w, g_w, u_w, d_w in ws:  # the data flow of a layer, so nothing is dead code
    q, k, v = x @ q_w, x @ k_w, x @ v_w
    x = x + 0.01 * (q @ o_w) + 0.01 * ((x @ g_w) * (x @ u_w)) @ d_w + 1e-6 * (k.sum() + v.sum())
  return x


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default="1,2,3,4,5,8,16")
  ap.add_argument("--passes", type=int, default=5)
  args = ap.parse_args(argv)
  rows = [int(m) for m in args.rows.split(",")]
  rng = np.random.default_rng(0)
  shapes = [(D, D), (D, KV), (D, KV), (D, D), (D, F), (D, F), (F, D)]
  ws = [[jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes] for _ in range(L)]
  e_VD = jnp.asarray(rng.standard_normal((V, D), dtype=np.float32))
  e_DV = jnp.asarray(np.asarray(e_VD).T.copy())
  kinds = {"layers [D,F]": (layers_fn, ws), "head [V,D]": (lambda x, e: jnp.einsum("MD,VD->MV", x, e), e_VD),
           "head [D,V]": (lambda x, e: x @ e, e_DV)}
  compiled = {}
  for opt_name, opts in OPTIONS.items():
    for kind, (fn, w) in kinds.items():
      for M in rows:
        x = jnp.asarray(rng.standard_normal((M, D), dtype=np.float32))
        c = jax.jit(fn).lower(x, w).compile(opts)
        jax.block_until_ready(c(x, w))
        compiled[opt_name, kind, M] = (c, x, w)
  times: dict = {}
  for _ in range(args.passes):
    for key, (c, x, w) in compiled.items():
      t0 = time.perf_counter()
      for _ in range(3):
        y = c(x, w)
      jax.block_until_ready(y)
      times.setdefault(key, []).append((time.perf_counter() - t0) / 3 * 1e3)
  print(f"ms per pass, best of {args.passes} interleaved passes")
  print("| settings | products | " + " | ".join(f"M={M}" for M in rows) + " |")
  print("|---|---|" + "---|" * len(rows))
  for opt_name in OPTIONS:
    for kind in kinds:
      print(f"| {opt_name} | {kind} | " + " | ".join(f"{min(times[opt_name, kind, M]):.1f}" for M in rows) + " |")


if __name__ == "__main__":
  main()
