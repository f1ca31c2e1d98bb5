"""What T tokens through the target cost relative to one (the verify pass of a T-1 node tree against a decode step),
output head included, timed inside jitted loops, under the decode settings of decode/xla_cpu.py ("xla": few-row
products in XLA's kernels, the head in column blocks for 2-16 rows, else as [D, V]), "xla-dv" (the same with the
head always as one [D, V] copy) and XLA:CPU's defaults ("ynn"), all compiled in one process and timed interleaved,
so the columns share the machine's minute-to-minute speed.

    python benchmarks/verify_cost.py --tokens 1,2,3,4,5,9,17 [--batch 4] [--modes xla,xla-dv,ynn]

Memory floor: a batch-1 step reads every weight once (SmolLM2 fp32: 540 MB); compute floor: 2 * params FLOPs per
token. A memory-bound kernel keeps T = 2..8 close to T = 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(tokens: list[int], batch: int, cache_len: int, n: int, modes: list[str], passes: int = 4
            ) -> dict[tuple[str, int], list[float]]:
  import jax
  import jax.numpy as jnp
  from eagle3_jax.decode import xla_cpu
  from eagle3_jax.nn import masks
  from eagle3_jax.target import load, protocol

  cfg, params = load.load_target()
  target = protocol.llama_target(cfg)
  loops = {}
  for mode in modes:
    os.environ[xla_cpu.ENV] = "xla" if mode == "xla-dv" else mode  # read while tracing and compiling below
    for T in tokens:
      start = jnp.full((batch,), cache_len // 2, jnp.int32)
      positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
      mask = masks.block_mask(start, jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (batch, T, T)),
                              cache_len)

      def body(p, carry, positions=positions, mask=mask):
        cache, toks = carry
        logits, _, cache = target.forward(p, toks, positions, cache, mask)
        return cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)  # keeps the head alive

      def loop(p, c, body=body, rows=1 if mode == "xla-dv" else batch * T):
        p = xla_cpu.decode_params(target, p, rows=rows)  # once, before the loop, as the engine's executables do
        return jax.lax.fori_loop(0, n, lambda i, c: body(p, c), c)

      carry = (target.init_cache(batch, cache_len, jnp.float32).replace(lengths=start),
               jnp.ones((batch, T), jnp.int32))
      # Weights are arguments: as closed-over constants XLA would fold (pre-transpose) them at compile time.
      compiled = jax.jit(loop).lower(params, carry).compile(xla_cpu.compiler_options(batch * T))
      jax.block_until_ready(compiled(params, carry))
      loops[mode, T] = (compiled, carry)
  times: dict[tuple[str, int], list[float]] = {}
  for _ in range(passes):  # interleaved: every shape of every mode once per pass
    for key, (compiled, carry) in loops.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(params, carry))
      times.setdefault(key, []).append((time.perf_counter() - t0) / n)
  return times


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", default="1,2,3,4,5,9,17")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--cache-len", type=int, default=512)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--passes", type=int, default=4)
  ap.add_argument("--modes", default="xla,ynn", help="decode settings to compare (decode/xla_cpu.py)")
  args = ap.parse_args(argv)
  tokens = [int(t) for t in args.tokens.split(",")]
  modes = args.modes.split(",")
  times = measure(tokens, args.batch, args.cache_len, args.n, modes, args.passes)
  base = min(times[modes[-1], tokens[0]])
  print(f"batch {args.batch}, cache {args.cache_len}; best of {args.passes} interleaved passes (median in brackets); "
        f"x = against T={tokens[0]} under {modes[-1]!r}")
  print("| settings | " + " | ".join(f"T={T} ms (x)" for T in tokens) + " |")
  print("|---|" + "---|" * len(tokens))
  for mode in modes:
    best = {T: min(times[mode, T]) for T in tokens}
    cells = [f"{best[T] * 1e3:.1f} [{np.median(times[mode, T]) * 1e3:.1f}] ({best[T] / base:.2f})" for T in tokens]
    print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
