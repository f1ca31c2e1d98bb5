"""Where a speculative round's time goes on this machine: XLA's own per-op trace of jitted round loops, grouped by
the named scopes of decode/speculative.py (draft_context, draft_expand, verify, commit, feed_back) and by op.

    python benchmarks/profile_round.py --trees 1x1x1,2x4x8 --batch 1 --cache-len 320

Also prints the bare target step (forward of 1 and P+1 tokens) timed the same way, so the round's overhead is a
ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _loop_time(fn, params, state, n, repeats=3):
  import jax
  loop = jax.jit(lambda p, s: jax.lax.fori_loop(0, n, lambda i, c: fn(p, c), s)).lower(params, state).compile()
  jax.block_until_ready(loop(params, state))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(params, state))
    best = min(best, time.perf_counter() - t0)
  return loop, best / n


def _hlo_scopes(loop) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata (jit scope path, with our named scopes) in the compiled module."""
  scopes = {}
  for line in loop.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", line)
    if m:
      scopes[m.group(1)] = m.group(2)
  return scopes


SCOPES = ("draft_context", "draft_expand", "verify", "commit", "feed_back", "decode_step", "sample")


def _scope_of(op_name: str) -> str:
  hit = [s for s in SCOPES if f"/{s}" in op_name or op_name.startswith(s)]
  return hit[-1] if hit else "other"


def _trace_ops(loop, params, state, n):
  """Per-op time (ms per loop iteration) of the compiled module's own ops, from a jax.profiler trace of one run."""
  import jax
  hlo = _hlo_scopes(loop)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      jax.block_until_ready(loop(params, state))
    files = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
    trace = json.load(gzip.open(files[0]))
  ops = collections.Counter()
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") == "X" and "dur" in ev:
      name = ev.get("name")
      if name in hlo:
        ops[(name, hlo[name])] += ev["dur"] / 1e3 / n
  return ops


def _report(ops, top, kinds=False):
  by_scope, by_kind = collections.Counter(), collections.Counter()
  for (name, op_name), ms in ops.items():
    by_scope[_scope_of(op_name)] += ms
    by_kind[(_scope_of(op_name), re.sub(r"[.\d]+$", "", name), re.sub(r"layer_\d+", "layer_*", op_name.split("/")[-1]))] += ms
  print(f"traced op time {sum(ops.values()):.2f} ms/iteration; by scope:",
        ", ".join(f"{s} {ms:.2f}" for s, ms in by_scope.most_common()))
  if kinds:
    for (scope, kind, last), ms in by_kind.most_common(15):
      print(f"   {ms:8.3f} ms  {scope:14s} {kind:28s} {last}")
  for (name, op_name), ms in ops.most_common(top):
    print(f"{ms:8.3f} ms  {name[:24]:24s} {op_name[-110:]}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--trees", default="1x1x1,2x4x8")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--cache-len", type=int, default=320)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--kinds", action="store_true", help="also group op time by HLO kind and jax primitive")
  args = ap.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from eagle3_jax.decode import engine, speculative, vanilla, sampling
  from eagle3_jax.decode.tree import TreeConfig
  from eagle3_jax.drafts import default_draft_path
  from eagle3_jax.nn import masks
  from eagle3_jax.target import load, protocol

  cfg, params = load.load_target()
  cfg, ckpt = engine.load_draft(str(default_draft_path()), cfg)
  target = protocol.llama_target(cfg)
  dparams, vocab, dcfg = ckpt.params, ckpt.vocab, ckpt.cfg
  embed = target.embed(params)
  B, S, T = args.batch, args.cache_len, 16

  def target_pass(P1):
    start = jnp.full((B,), S // 2, jnp.int32)
    tokens = jnp.ones((B, P1), jnp.int32)
    positions = start[:, None] + jnp.arange(P1, dtype=jnp.int32)[None, :]
    mask = masks.block_mask(start, jnp.broadcast_to(jnp.tril(jnp.ones((P1, P1), bool)), (B, P1, P1)), S)
    fn = lambda p, c: target.forward(p, tokens, positions, c, mask)[2]
    cache = target.init_cache(B, S, embed.dtype).replace(lengths=start)
    loop, t = _loop_time(fn, params, cache, args.n)
    if args.kinds:
      _report(_trace_ops(loop, params, cache, args.n), 0, args.kinds)
    return t

  kw = dict(target=target, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=S - T)
  vstate = jax.jit(lambda p, t, l, c, k: vanilla.prefill(p, t, l, c, k, **kw))(
      params, jnp.ones((B, T), jnp.int32), jnp.full((B,), T, jnp.int32), target.init_cache(B, S, embed.dtype),
      jax.random.key(0))
  vloop, step = _loop_time(lambda p, s: vanilla.decode_step(p, s, **kw), params, vstate, args.n)
  print(f"B={B} S={S}: vanilla decode_step {step * 1e3:.2f} ms; bare forward of 1 token "
        f"{target_pass(1) * 1e3:.2f} ms")
  _report(_trace_ops(vloop, params, vstate, args.n), args.top, args.kinds)
  for shape in args.trees.split(","):
    k, d, p = (int(x) for x in shape.split("x"))
    tcfg = TreeConfig(top_k=k, depth=d, total_tokens=p)
    spec = speculative.SpecConfig(tree=tcfg, max_new_tokens=S - T - p, cache_len=S)
    state = speculative.prefill_jit(target, params, dparams, embed, jnp.ones((B, T), jnp.int32),
                                    jnp.full((B,), T, jnp.int32), jax.random.key(0), dcfg=dcfg, spec=spec)
    fn = lambda ps, s: speculative.spec_round(target, ps[0], ps[1], ps[2], ps[3], s, dcfg=dcfg, spec=spec)
    n = min(args.n, max(1, (spec.max_new_tokens - 1) // (d + 1) // 2))
    loop, t_round = _loop_time(fn, (params, dparams, embed, vocab), state, n)
    print(f"\n== {shape}: round {t_round * 1e3:.2f} ms; bare forward of {p + 1} tokens {target_pass(p + 1) * 1e3:.2f} ms")
    ops = _trace_ops(loop, (params, dparams, embed, vocab), state, n)
    _report(ops, args.top, args.kinds)


if __name__ == "__main__":
  main()
