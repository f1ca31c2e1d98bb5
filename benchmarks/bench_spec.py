"""Speculative decoding on SmolLM2: tau and tokens/s against vanilla per tree shape and batch size, the cost of one
round against one vanilla decode step, and the verify cost per node count (which tree size pays on this machine).

    python benchmarks/bench_spec.py [--target PATH] [--draft PATH|random] [--max-new-tokens 32] [--prompts 4]
        [--trees 1x4x4,4x4x16,8x5x32,10x5x60] [--batch-sizes 1,4] [--repeats 2]

Greedy, fp32, EOS ignored (exactly max_new_tokens per prompt), compilation and a warm-up call excluded; speculative
and vanilla runs are interleaved in the same process so machine noise hits both alike. Tree shapes are
top_k x depth x total_tokens (depth = draft levels; the official EAGLE `depth` is ours minus one). With a random
draft nothing is accepted (tau = 1): the speedup column is then the price of a round, not a forecast.
Prints a markdown summary and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np
from eagle3_jax.nn import masks
from eagle3_jax.target import protocol

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def load_draft(arg: str, cfg, params):
  """(cfg with the draft's aux layers, dcfg, draft params, vocab, embed) from a checkpoint, or a random draft."""
  import jax

  from eagle3_jax.draft import head as draft
  from eagle3_jax.draft.vocab import DraftVocab
  from eagle3_jax import interop

  if arg != "random":
    ckpt = interop.read_draft(arg, num_target_layers=cfg.num_layers)
    cfg = dataclasses.replace(cfg, aux_layers=tuple(ckpt.aux_layer_ids))
    return cfg, ckpt.cfg, jax.tree.map(jax.numpy.asarray, ckpt.params), ckpt.vocab, ckpt.embed
  # Vd = 16384 as configs/smollm2_135m.py trains it; the lowest ids stand in for the frequency-ranked ones.
  dcfg = draft.DraftConfig.for_target(cfg, draft_vocab_size=min(16384, cfg.vocab_size))
  return (cfg, dcfg, draft.init_params(dcfg, jax.random.key(0)),
          DraftVocab.from_ids(np.arange(dcfg.draft_vocab_size), cfg.vocab_size), None)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default=None, help="HF dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
  ap.add_argument("--draft", default="random", help="draft checkpoint directory, or 'random'")
  ap.add_argument("--max-new-tokens", type=int, default=32)
  ap.add_argument("--prompts", type=int, default=4, help="first N of infer.py's built-in prompts")
  ap.add_argument("--trees", default="1x4x4,4x4x16,8x5x32,10x5x60")
  ap.add_argument("--batch-sizes", default="1,4")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--verify-nodes", default="1,2,4,8,16,32,64")
  ap.add_argument("--context", type=int, default=256, help="committed tokens in the cache for the cost curves")
  ap.add_argument("--skip", default="", help="comma list of parts to skip: e2e, costs, loop, floor")
  ap.add_argument("--cost-repeats", type=int, default=7, help="interleaved timings per cost item (best is kept)")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp

  import infer
  from eagle3_jax.decode import vanilla, engine, sampling, speculative as sp
  from eagle3_jax.draft import head as draft
  from eagle3_jax.draft.vocab import DraftVocab
  from eagle3_jax.target import llama, load
  from eagle3_jax.decode.tree import TreeConfig

  cfg, tparams = load.load_target(args.target, dtype=jnp.float32)
  tokenizer = load.load_tokenizer(args.target)
  cfg, dcfg, dparams, vocab, embed = load_draft(args.draft, cfg, tparams)
  embed = tparams["embed"] if embed is None else jnp.asarray(embed)
  target = protocol.llama_target(cfg)
  M = args.max_new_tokens
  trees = [TreeConfig(top_k=k, depth=d, total_tokens=n)
           for k, d, n in (map(int, t.split("x")) for t in args.trees.split(","))]
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  prompts = engine.Engine(None, tokenizer).encode(infer.default_requests())[:args.prompts]
  greedy = sampling.SamplingConfig()

  # ----- end to end: tokens/s and tau, speculative against vanilla on the same prompts ---------------------------
  runs: dict[str, dict] = {}
  skip = set(args.skip.split(",")) - {""}
  for B in ([] if "e2e" in skip else batch_sizes):
    batches = [b for _, b in engine.Engine(None, tokenizer, batch_size=B).batches(prompts)]

    def run_vanilla(batch):
      S = vanilla.cache_length(batch.tokens.shape[1], M)
      st = vanilla.generate_jit(tparams, batch.tokens, batch.lengths, llama.init_cache(cfg, B, S), jax.random.key(0),
                               target=target, sampling_cfg=greedy, max_new_tokens=M)
      return np.asarray(st.tokens)[:batch.n_real], None

    def speculative(batch, tree):
      spec = sp.SpecConfig(tree=tree, max_new_tokens=M)
      st = sp.generate(target, tparams, dparams, vocab, batch.tokens, batch.lengths, jax.random.key(0), embed,
                       dcfg=dcfg, spec=spec)
      out = sp.outputs(st, spec)
      return out["tokens"][:batch.n_real], (out["rounds"][:batch.n_real], out["accepted"][:batch.n_real])

    kinds = {"vanilla": run_vanilla} | {f"{t.top_k}x{t.depth}x{t.total_tokens}": (lambda b, t=t: speculative(b, t))
                                    for t in trees}
    for name, fn in kinds.items():  # compile + warm up
      t0 = time.perf_counter()
      for batch in batches:
        fn(batch)
      print(f"[B={B}] {name}: compiled and warmed up in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    for _ in range(args.repeats):
      for name, fn in kinds.items():
        r = runs.setdefault(f"{name}_b{B}", {"seconds": [], "tokens": None, "rounds": 0, "accepted": 0})
        seconds, toks, rounds, accepted = 0.0, [], 0, 0
        for batch in batches:
          t0 = time.perf_counter()
          out, extra = fn(batch)
          seconds += time.perf_counter() - t0
          toks.append(out)
          if extra is not None:
            rounds, accepted = rounds + int(extra[0].sum()), accepted + int(extra[1].sum())
        r["seconds"].append(seconds)
        r["tokens"], r["rounds"], r["accepted"] = np.concatenate(toks), rounds, accepted

  table = []
  for key, r in runs.items():
    name, B = key.rsplit("_b", 1)
    base = runs[f"vanilla_b{B}"]
    tok_s = r["tokens"].size / statistics.median(r["seconds"])
    row = {"run": name, "batch": int(B), "tokens_per_s": round(tok_s, 2),
           "speedup": round(tok_s / (base["tokens"].size / statistics.median(base["seconds"])), 3)}
    if name != "vanilla":
      row |= {"tau": round(r["accepted"] / max(r["rounds"], 1), 3),
              "identical_to_vanilla": bool(np.array_equal(r["tokens"], base["tokens"]))}
    table.append(row)

  # ----- cost curves at a fixed context: one decode step, one verify per node count, one full round --------------
  curves: dict[str, dict] = {}
  L = args.context
  for B in ([] if "costs" in skip else batch_sizes):
    S = L + M + 128
    cache = llama.init_cache(cfg, B, S)
    fresh = lambda: jnp.full((B,), L, jnp.int32)  # a new buffer each time: calls below donate their state

    # Weights are arguments, never closed over: a closure would embed 540 MB of constants in the program.
    @jax.jit
    def fill(tparams, cache):  # a realistic committed prefix (the cost of attention grows with it)
      _, _, cache = llama.forward(tparams, jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L), (B, L)),
                                  cache, masks.cache_causal_mask(cache.lengths, L, S), cfg=cfg)
      return cache.replace(lengths=fresh())

    cache = fill(tparams, cache)

    @functools.partial(jax.jit, donate_argnums=1)
    def verify(tparams, cache, tokens):
      T = tokens.shape[1]
      tree_mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
      logits, _, cache = llama.forward(tparams, tokens, cache.lengths[:, None] + jnp.arange(T)[None],
                                       cache, masks.block_mask(cache.lengths, tree_mask, S), cfg=cfg)
      return jnp.argmax(logits, -1), cache

    step = jax.jit(lambda p, st: vanilla.decode_step(p, st, target=target, sampling_cfg=greedy,
                                                     max_new_tokens=10 ** 6),
                   donate_argnums=1)
    copy = lambda: jax.tree.map(jnp.copy, cache).replace(lengths=fresh())
    timed = {}  # name -> a callable running one donated step on its own state, rewound to context L each time

    box_step = {"st": vanilla.DecodeState(cache=copy(), last=jnp.ones((B,), jnp.int32),
                                         tokens=jnp.zeros((B, 8), jnp.int32), counts=jnp.zeros((B,), jnp.int32),
                                         done=jnp.zeros((B,), bool), key=jax.random.key(0),
                                         steps=jnp.zeros((), jnp.int32))}

    def one_step(box=box_step):
      box["st"] = step(tparams, box["st"].replace(cache=box["st"].cache.replace(lengths=fresh())))
      jax.block_until_ready(box["st"].last)

    timed["step"] = one_step
    for P in [int(p) for p in args.verify_nodes.split(",")]:
      def one_verify(box={"cache": copy()}, toks=jnp.ones((B, P + 1), jnp.int32)):
        out, box["cache"] = verify(tparams, box["cache"], toks)
        jax.block_until_ready(out)

      timed[f"verify_{P}"] = one_verify
    for tree in trees:
      # max_new_tokens sizes the draft cache like the target's (S slots); the rounds below never emit that many.
      spec = sp.SpecConfig(tree=tree, max_new_tokens=L + M, cache_len=S)
      R, zeros = spec.rows, lambda: jnp.zeros((B,), jnp.int32)
      # A mid-generation state without a prefill compile: target context of L tokens, draft prefix of L - 1.
      st = sp.SpecState(cache=copy(),
                        draft_cache=draft.init_cache(dcfg, B, spec.cache_lengths(16)[1]).replace(lengths=fresh() - 1),
                        pending_hidden=jnp.zeros((B, R, dcfg.hidden_size)), pending_tokens=jnp.ones((B, R), jnp.int32),
                        pending_count=zeros() + 1, tokens=jnp.zeros((B, spec.max_new_tokens + R), jnp.int32),
                        counts=zeros(), done=jnp.zeros((B,), bool), key=jax.random.key(0), rounds=zeros(),
                        accepted=zeros(), steps=jnp.zeros((), jnp.int32))

      def one_round(box={"st": st}, spec=spec):
        s = box["st"]
        s = s.replace(cache=s.cache.replace(lengths=fresh()), draft_cache=s.draft_cache.replace(lengths=fresh() - 1),
                      pending_count=jnp.ones((B,), jnp.int32), done=jnp.zeros((B,), bool),
                      counts=jnp.zeros((B,), jnp.int32))
        box["st"] = sp.round_jit(target, tparams, dparams, embed, vocab, s, dcfg=dcfg, spec=spec)
        jax.block_until_ready(box["st"].counts)

      timed[f"round_{tree.top_k}x{tree.depth}x{tree.total_tokens}"] = one_round
    for fn in timed.values():  # compile and warm up
      fn()
      fn()
    # Interleaved, best of N: on a shared machine the minimum is the least disturbed measurement of each.
    samples = {name: [] for name in timed}
    for _ in range(args.cost_repeats):
      for name, fn in timed.items():
        t = time.perf_counter()
        fn()
        samples[name].append(1e3 * (time.perf_counter() - t))
    best = {name: round(min(v), 2) for name, v in samples.items()}
    step_ms = best["step"]
    verify_ms = {int(k.split("_")[1]): v for k, v in best.items() if k.startswith("verify_")}
    round_ms = {k.split("_", 1)[1]: v for k, v in best.items() if k.startswith("round_")}
    curves[f"b{B}"] = {"decode_step_ms": round(step_ms, 2), "verify_ms": verify_ms, "round_ms": round_ms,
                       "round_over_step": {k: round(v / step_ms, 2) for k, v in round_ms.items()},
                       "verify_over_step": {p: round(v / step_ms, 2) for p, v in verify_ms.items()}}

  # ----- in the loop: ms per vanilla step and per speculative round inside the jitted while_loops ----------------
  # Differential: (time for M2 new tokens - time for M1) / (loop iterations M2 - M1), so prefill, dispatch and
  # compilation cancel and what remains is the price of one iteration as generation really pays it.
  in_loop: dict[str, dict] = {}
  M1, M2 = 16, 48
  for B in ([] if "loop" in skip else batch_sizes):
    batch = next(iter(engine.Engine(None, tokenizer, batch_size=B).batches(prompts)))[1]

    def van_steps(m, batch=batch):
      S = vanilla.cache_length(batch.tokens.shape[1], m)
      return int(vanilla.generate_jit(tparams, batch.tokens, batch.lengths, llama.init_cache(cfg, B, S),
                                     jax.random.key(0), target=target, sampling_cfg=greedy, max_new_tokens=m).steps)

    def spec_steps(m, tree, batch=batch):
      spec = sp.SpecConfig(tree=tree, max_new_tokens=m)
      return int(sp.generate(target, tparams, dparams, vocab, batch.tokens, batch.lengths, jax.random.key(0), embed,
                             dcfg=dcfg, spec=spec).steps)

    kinds = {"step": van_steps} | {f"round_{t.top_k}x{t.depth}x{t.total_tokens}": functools.partial(spec_steps, tree=t)
                                   for t in trees}
    for fn in kinds.values():
      fn(M1), fn(M2)
    best = {(k, m): float("inf") for k in kinds for m in (M1, M2)}
    iters = {}
    for _ in range(args.cost_repeats):
      for k, fn in kinds.items():
        for m in (M1, M2):
          t0 = time.perf_counter()
          iters[k, m] = fn(m)
          best[k, m] = min(best[k, m], time.perf_counter() - t0)
    ms = {k: round(1e3 * (best[k, M2] - best[k, M1]) / max(iters[k, M2] - iters[k, M1], 1), 2) for k in kinds}
    in_loop[f"b{B}"] = {"ms": ms, "over_step": {k: round(v / ms["step"], 2) for k, v in ms.items() if k != "step"},
                        "iterations": {k: [iters[k, M1], iters[k, M2]] for k in kinds}}

  # ----- floor: the target's own forward without a cache at 1 and at 1 + P tokens ---------------------------------
  # Pure weight matmuls + elementwise work: what XLA on this machine charges for running 1 + P rows through the
  # weights instead of 1, before any tree, mask or KV cache is involved. Eight forwards per call, each depending
  # on the loop index, so dispatch cost is amortised and nothing is hoisted.
  floor = {}
  if "floor" not in skip:
    @functools.partial(jax.jit, static_argnums=1)
    def forwards(tparams, T):
      def body(i, acc):
        toks = (jnp.arange(T, dtype=jnp.int32)[None] * 7 + i) % cfg.vocab_size
        logits, _, _ = llama.forward(tparams, toks, jnp.arange(T)[None], None, masks.causal_mask(jnp.full((1,), T), T),
                                     cfg=cfg)
        return acc + logits[0, -1, 0]
      return jax.lax.fori_loop(0, 8, body, 0.0)

    sizes = sorted({1} | {t.total_tokens + 1 for t in trees})
    for T in sizes:
      forwards(tparams, T).block_until_ready()
    samples = {T: [] for T in sizes}
    for _ in range(args.cost_repeats):
      for T in sizes:
        t0 = time.perf_counter()
        forwards(tparams, T).block_until_ready()
        samples[T].append((time.perf_counter() - t0) / 8 * 1e3)
    floor = {"forward_ms": {T: round(min(v), 2) for T, v in samples.items()}}
    floor["over_1"] = {T: round(v / floor["forward_ms"][1], 2) for T, v in floor["forward_ms"].items()}

  result = {
      "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
      "backend": jax.default_backend(), "jax": jax.__version__, "target": args.target or "SmolLM2-135M-Instruct fp32",
      "draft": args.draft, "draft_vocab": dcfg.draft_vocab_size, "prompts": len(prompts), "max_new_tokens": M,
      "repeats": args.repeats, "context_for_costs": L, "runs": table, "costs": curves, "in_loop": in_loop,
      "floor": floor,
  }
  print("| run | batch | tokens/s | speedup | tau | identical |\n|---|---|---|---|---|---|")
  for r in table:
    print(f"| {r['run']} | {r['batch']} | {r['tokens_per_s']} | {r['speedup']} | {r.get('tau', '')} | "
          f"{r.get('identical_to_vanilla', '')} |")
  for b, c in curves.items():
    print(f"\n{b}: decode step {c['decode_step_ms']} ms; verify ms by nodes {c['verify_ms']}; "
          f"round ms {c['round_ms']}; round / step {c['round_over_step']}")
  for b, c in in_loop.items():
    print(f"\n{b} in the loop: ms {c['ms']}; round / step {c['over_step']}")
  if floor:
    print(f"\nforward without cache, ms by tokens {floor['forward_ms']}; / 1 token {floor['over_1']}")
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
