"""What T tokens through the target cost relative to one (the verify pass of a T-1 node tree against a decode step),
output head included, timed inside jitted loops; optionally under other XLA flags, each in a fresh process.

    python benchmarks/verify_cost.py --tokens 1,2,3,5,9,17 [--flags= --flags=--xla_cpu_experimental_ynn_fusion_type=-dot]

Memory floor: a batch-1 step reads every weight once (SmolLM2 fp32: 540 MB); compute floor: 2 * params FLOPs per
token. A memory-bound kernel keeps T = 2..8 close to T = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(tokens: list[int], batch: int, cache_len: int, n: int) -> dict[int, float]:
  import jax
  import jax.numpy as jnp
  from eagle3_jax.nn import masks
  from eagle3_jax.target import load, protocol

  cfg, params = load.load_target()
  target = protocol.llama_target(cfg)
  out = {}
  for T in tokens:
    start = jnp.full((batch,), cache_len // 2, jnp.int32)
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    mask = masks.block_mask(start, jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (batch, T, T)), cache_len)

    def body(p, carry):
      cache, toks = carry
      logits, _, cache = target.forward(p, toks, positions, cache, mask)
      return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)  # keeps the head alive

    carry = (target.init_cache(batch, cache_len, jnp.float32).replace(lengths=start), jnp.ones((batch, T), jnp.int32))
    # Weights are arguments: as closed-over constants XLA would fold (pre-transpose) them at compile time.
    loop = jax.jit(lambda p, c: jax.lax.fori_loop(0, n, lambda i, c: body(p, c), c)).lower(params, carry).compile()
    jax.block_until_ready(loop(params, carry))
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(loop(params, carry))
      best = min(best, time.perf_counter() - t0)
    out[T] = best / n
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", default="1,2,3,5,9,17")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--cache-len", type=int, default=512)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--flags", action="append", default=None,
                  help="an XLA_FLAGS setting to compare (repeatable, --flags=VALUE), each in its own process")
  ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  tokens = [int(t) for t in args.tokens.split(",")]
  if args.flags is None:
    res = measure(tokens, args.batch, args.cache_len, args.n)
    if args.json:
      print(json.dumps(res))
      return
    for T, s in res.items():
      print(f"T={T:3d}: {s * 1e3:7.2f} ms  {s / res[tokens[0]]:.2f}x T={tokens[0]}")
    return
  print("| XLA_FLAGS | " + " | ".join(f"T={T} ms (x)" for T in tokens) + " |")
  print("|---|" + "---|" * len(tokens))
  for flags in args.flags:
    env = dict(os.environ, XLA_FLAGS=flags)
    r = subprocess.run([sys.executable, __file__, "--tokens", args.tokens, "--batch", str(args.batch),
                        "--cache-len", str(args.cache_len), "--n", str(args.n), "--json"],
                       env=env, capture_output=True, text=True)
    if r.returncode:
      print(f"| `{flags}` | failed: {r.stderr.strip().splitlines()[-1][:200]} |", flush=True)
      continue
    res = {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    base = res[tokens[0]]
    print(f"| `{flags or '(default)'}` | " + " | ".join(f"{res[T] * 1e3:.1f} ({res[T] / base:.2f})" for T in tokens)
          + " |", flush=True)


if __name__ == "__main__":
  main()
