"""The cost model: what a decode step, a prefill and every part of a draft-verify round cost on this machine,
timed inside jitted loops (compilation and dispatch excluded), cached per machine, target, draft shape, batch
size and dtype, and recalibrated when any of them changes.

Parts: the target's decode step (the engine's own loop body) at two cache lengths (attention reads every slot),
prefill at two prompt lengths, the verify pass over P tree nodes, the draft's context pass over R rows and its
expansion per top_k and depth. One real chain round and one real tree round anchor what the parts miss (accept,
commit, emit, the loop), and the first run of each compiled loop gives the one-time cost an engine pays per shape.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.decode import speculative, tree, xla_cpu
from eagle3_jax.decode.autotree.acceptance import FORMAT, MAX_DEPTH, MAX_TOP_K
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.interop import files
from eagle3_jax.nn import masks
from eagle3_jax.target import protocol

VERIFY_POINTS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)  # tree nodes P timed; others interpolate linearly
# Tree nodes whose verify pass is also timed over CACHE_LENS[1]: attention's cost per cache slot grows with the
# tokens a row reads it with (batch 4: 33 us a slot for a step, 37-55 for 4 tokens a row, 39-65 for 9), and a
# continuous batcher runs its rounds over up to 1,024 slots while a long prompt is served.
VERIFY_SLOT_POINTS = (3, 8)
EXPAND_DEPTHS = (1, 4)  # expansion is timed at two depths per top_k; other depths are linear between them
CACHE_LENS = (256, 1024)  # the step is timed at both: attention reads every slot, so cost grows with the cache
PREFILL_LENS = (64, 512)  # prompt tokens per row of the two timed prefills of a batch; other lengths are linear
# Prompt tokens of the timed one-row admissions (a slot batcher's own admission executable). A prefill's cost is
# concave at short prompts (the weights are read once whatever T) and convex at long ones (attention is T^2): from
# 64 and 512 alone a 48-token admission came out 17% under its measured cost, a 768-token one 5%.
ADMIT_LENS = (16, 64, 512, 1024)
SPEC_ADMIT_LENS = (64, 512)  # the same with a draft (its pass over the prompt): priced as a ratio to the plain one
ANCHOR_REPEATS = 3  # timings of each anchor round (interleaved with the others and with steps); the median counts
SLOT_REPEATS = 3  # interleaved timings of a loop over both cache lengths; the median difference counts
VERSION = 12  # of the timing method; cached calibrations of another version are redone (2: output head kept;
# 3: one-row prefill for continuous batching's admissions; 4: anchors as ratios to steps timed beside them;
# 5: loops compiled and laid out as the engine's decode executables, decode/xla_cpu.py; 6: the head in column
# blocks for 8-16 rows a step, llama.decode_layout; 7: each anchor's median of ANCHOR_REPEATS interleaved ratios,
# the one-row prefill under XLA's defaults at batch 1 too; 8: a top-4 tree anchor, trees' extra linear in top_k;
# 9: the decode layout made outside the timed loops and priced on its own, `layout`; 10: admissions timed as the
# slot batcher's own executables at four lengths, with a draft too; the slot cost per verified node count and as
# a median of interleaved differences; chain anchors at every depth 1-4; 11: admissions over max(1024, T) slots;
# 12: the slot batcher's own step as a ratio to the step, `slot_loop`)


@dataclasses.dataclass(frozen=True)
class Costs:
  """Seconds on this machine at one batch size. At cache length CACHE_LENS[0]: the target's decode step, its verify
  pass for P tree nodes (P + 1 tokens with the root), the draft's context pass for R rows and its expansion per
  (top_k, depth); `extra`: what real rounds cost beyond those parts (accept, commit, emit, the loop, and what the
  parts timed alone miss), by depth, per `extra_key` (chains, top-2 trees, top-k trees), from real anchor rounds.
  `slot`: seconds a step gains per extra cache slot; `slot_nodes`: the same for a verify pass of P tree nodes (P ->
  seconds a slot), linear in P between them and `slot` (P = 0), flat past the last. `prefill`: prompt length ->
  seconds of the target's prefill of a batch. `admit`: the same for one row as a slot batcher admits it (its own
  admission executable: prefill and the write into a slot); `admit_spec`: with a draft, whose pass over the prompt
  comes with it, priced as its ratio to `admit` at the same length. `first_call`: one-time
  seconds of a new executable's first run, per kind ("plain", "chain", "tree"). `layout`: seconds of the target's
  decode layout (decode/xla_cpu.py: a [D, V] copy of a tied head, 113 MB for SmolLM2), which a generator or slot
  batcher makes once and keeps (xla_cpu.KeptLayouts), so a run pays it once. Timed inside
  loops of 8 steps it once added 1/8 of its ~52 ms to every step, verify pass and round (plain steps priced 20% over
  the engine's: BENCHMARKS.md "Tree choice with the layout priced apart")."""

  step: float
  slot: float
  first_call: dict[str, float]
  prefill: dict[int, float]
  verify: dict[int, float]
  context: dict[int, float]
  expand: dict[int, dict[int, float]]  # top_k -> depth -> seconds
  extra: dict[str, dict[int, float]] = dataclasses.field(
      default_factory=lambda: {"chain": {1: 0.0}, "tree": {1: 0.0}})  # kind -> depth -> seconds
  meta: dict = dataclasses.field(default_factory=dict)
  admit: dict[int, float] = dataclasses.field(default_factory=dict)  # prompt length -> seconds, one row
  layout: float = 0.0  # seconds per decode-executable call, before its loop
  slot_nodes: dict[int, float] = dataclasses.field(default_factory=dict)  # tree nodes -> seconds a cache slot
  admit_spec: dict[int, float] = dataclasses.field(default_factory=dict)  # prompt length -> seconds, with a draft
  slot_loop: float = 1.0  # a slot batcher's step (its own loop, all slots busy) as a multiple of `step`

  @staticmethod
  def _line(table: dict[int, float], x: float) -> float:
    """Piecewise-linear through the measured points, extended linearly past both ends."""
    xs = sorted(table)
    ys = [table[k] for k in xs]
    if len(xs) == 1:
      return ys[0]
    if x <= xs[0] or x >= xs[-1]:
      i = 0 if x <= xs[0] else len(xs) - 2
      return ys[i] + (x - xs[i]) * (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(np.interp(x, xs, ys))

  def slot_s(self, nodes: int = 0) -> float:
    """Seconds a pass over `nodes` tree nodes (0: a decode step) gains per extra cache slot; never less than a
    step's (more tokens read the same slots)."""
    if not self.slot_nodes:
      return self.slot
    table = {0: self.slot, **self.slot_nodes}
    return max(self.slot, self._line(table, min(nodes, max(table))))

  def _at(self, cache_len: int | None, nodes: int = 0) -> float:
    return 0.0 if cache_len is None else (cache_len - CACHE_LENS[0]) * self.slot_s(nodes)

  def step_s(self, cache_len: int | None = None) -> float:
    return self.step + self._at(cache_len)

  def prefill_s(self, prompt_len: int) -> float:
    return max(self._line(self.prefill, prompt_len), 0.0)

  def admit_s(self, prompt_len: int, speculative: bool = False) -> float:
    """One row's admission into a slot batcher; `speculative`: with the draft's pass over the prompt."""
    return max(self._line(self.admit or self.prefill, prompt_len), 0.0) * (
        self.draft_share(prompt_len) if speculative else 1.0)

  def draft_share(self, prompt_len: int) -> float:
    """A speculative admission's cost as a multiple of a plain one's (>= 1): linear between the timed lengths,
    flat past them (a ratio of two timings, extrapolated, would drift)."""
    if not self.admit_spec or not self.admit:
      return 1.0
    ratio = {T: s / max(self._line(self.admit, T), 1e-12) for T, s in self.admit_spec.items()}
    return max(1.0, self._line(ratio, min(max(prompt_len, min(ratio)), max(ratio))))

  def verify_s(self, P: int) -> float:
    return self._line(self.verify, P)

  def context_s(self, R: int) -> float:
    return self._line(self.context, R)

  def expand_s(self, k: int, depth: int) -> float:
    return self._line(self.expand[k], depth)

  def extra_s(self, tcfg: TreeConfig) -> float:
    """What a real round costs beyond its parts: from the chain anchors for a chain; for a tree, from the tree
    anchors of each timed top_k (`extra_key`), linear in top_k between them. Held flat past the anchors, in depth
    and in top_k: extrapolating a noisy difference of two timings invites absurd shapes."""
    flat = lambda table, x: self._line(table, min(max(x, min(table)), max(table)))  # noqa: E731
    if tcfg.is_chain:
      return flat(self.extra["chain"], tcfg.depth)
    by_k = {2 if key == "tree" else int(key[len("tree"):]): flat(table, tcfg.depth)
            for key, table in self.extra.items() if key.startswith("tree")}
    return flat(by_k, tcfg.top_k)

  def round_s(self, tcfg: TreeConfig, cache_len: int | None = None) -> float:
    extra = self.extra_s(tcfg)
    # A verify pass is a target forward of more tokens than a step's, so it never costs less than the step (the two
    # are timed minutes apart, and the step is the median of several timings).
    return (self.context_s(tcfg.max_accept + 1) + self.expand_s(tcfg.top_k, tcfg.depth)
            + max(self.verify_s(tcfg.total_tokens), self.step) + extra + self._at(cache_len, tcfg.total_tokens))

  def to_json(self) -> dict:
    ints = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731
    return {"step": self.step, "slot": self.slot, "first_call": dict(self.first_call),
            "prefill": ints(self.prefill), "verify": ints(self.verify),
            "context": ints(self.context), "expand": {str(k): ints(e) for k, e in self.expand.items()},
            "extra": {k: ints(e) for k, e in self.extra.items()}, "meta": self.meta, "admit": ints(self.admit),
            "layout": self.layout, "slot_nodes": ints(self.slot_nodes), "admit_spec": ints(self.admit_spec),
            "slot_loop": self.slot_loop}

  @classmethod
  def from_json(cls, obj: dict) -> "Costs":
    ints = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    return cls(step=obj["step"], slot=obj["slot"], first_call=dict(obj["first_call"]),
               prefill=ints(obj["prefill"]), verify=ints(obj["verify"]),
               context=ints(obj["context"]), expand={int(k): ints(e) for k, e in obj["expand"].items()},
               extra={k: ints(e) for k, e in obj["extra"].items()}, meta=obj.get("meta", {}),
               admit=ints(obj.get("admit", {})), layout=float(obj.get("layout", 0.0)),
               slot_nodes=ints(obj.get("slot_nodes", {})), admit_spec=ints(obj.get("admit_spec", {})),
               slot_loop=float(obj.get("slot_loop", 1.0)))


def extra_key(tcfg: TreeConfig) -> str:
  """Key of `Costs.extra` an anchor round of this shape sets: "chain", "tree" (top_k 2) or "tree<top_k>"."""
  return "chain" if tcfg.is_chain else "tree" if tcfg.top_k == 2 else f"tree{tcfg.top_k}"


def _time_loop(fn, params: Any, state: Any, n: int, repeats: int = 3, first: list | None = None,
               keep: list | None = None, prepare=None, decode: bool = True, rows: int = 2) -> float:
  """Seconds per iteration of a jitted fori_loop(n) of `fn(params, carry) -> carry`: compiled, run once, then the
  best of `repeats` timed runs, so dispatch and compilation stay out. Weights are arguments, not constants.
  `first`, if given, receives what the first run of the compiled loop cost beyond a later one: XLA:CPU does
  one-time work there (0.75 s for a SmolLM2 decode executable on 2 cores), which an engine pays once per shape.
  `keep`, if given, receives a function that times the compiled loop again (same method, no recompilation).
  Loops are compiled and laid out as the engine's decode executables are (decode/xla_cpu.py): `prepare` maps the
  params to their decode layout, here once outside the timed loop (its cost per executable call is `layout_cost`'s);
  `rows` (batch x tokens a step) picks the compiler options; decode=False keeps XLA's defaults (an admission's
  prefill)."""
  if prepare is not None:
    params = jax.block_until_ready(jax.jit(prepare)(params))

  def body(p, s):
    return jax.lax.fori_loop(0, n, lambda i, c: fn(p, c), s)

  loop = jax.jit(body).lower(params, state).compile(xla_cpu.compiler_options(rows) if decode else None)
  t0 = time.perf_counter()
  jax.block_until_ready(loop(params, state))
  t_first = time.perf_counter() - t0

  def best_of() -> float:
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(loop(params, state))
      best = min(best, time.perf_counter() - t0)
    return best / n

  seconds = best_of()
  if first is not None:
    first.append(max(t_first - seconds * n, 0.0))
  if keep is not None:
    keep.append(best_of)
  return seconds


def _slot_cost(near, far, repeats: int = SLOT_REPEATS) -> float:
  """Seconds per extra cache slot from the same loop compiled over CACHE_LENS[0] and CACHE_LENS[1] slots (`near`,
  `far`: functions that time them again), as the median of `repeats` differences timed in turn: one difference of
  two single timings minutes apart once came out twice the others' (63.5 us a slot at batch 4 against 32-36)."""
  diffs = [far() - near() for _ in range(repeats)]
  return max(float(np.median(diffs)), 0.0) / (CACHE_LENS[1] - CACHE_LENS[0])


def _slot_loop(target: protocol.Target, params: Any, *, batch: int, cache_len: int, n: int = 16):
  """A function timing one step of a slot batcher's own loop (decode/batching.run_steps, n steps a call, every slot
  busy, the params laid out as the batcher keeps them), compiled as the batcher compiles it."""
  from eagle3_jax.config import SlotConfig
  from eagle3_jax.decode import batching, sampling  # deferred: they import autotree lazily

  cfg = SlotConfig(sampling=sampling.SamplingConfig(), max_new_tokens=cache_len)
  state = batching.init_state(target, batch, cache_len, cfg, target.embed(params).dtype)
  state = state.replace(done=jnp.zeros((batch,), bool),
                        cache=state.cache.replace(lengths=jnp.full((batch,), cache_len // 2, jnp.int32)))
  laid = jax.block_until_ready(xla_cpu.decode_params(target, params, rows=batch))
  steps = jnp.asarray(n, jnp.int32)
  fn = jax.jit(batching.run_steps, static_argnames=("target", "cfg")).lower(
      laid, state, steps, target=target, cfg=cfg).compile(xla_cpu.compiler_options(batch))
  jax.block_until_ready(fn(laid, state, steps))

  def best_of(repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(laid, state, steps))
      best = min(best, time.perf_counter() - t0)
    return best / n

  return best_of


def _admit_cost(target: protocol.Target, target_params: Any, draft_params: Any, vocab: DraftVocab,
                dcfg: draft.DraftConfig, *, batch: int, prompt_len: int, repeats: int = 2) -> float:
  """Seconds of one request's admission into a slot batcher of `batch` slots, as it admits: its own admission
  executable (decode/batching.py, or with draft_params spec_batching.py: the draft's pass over the prompt too)
  under XLA's defaults, into caches of max(CACHE_LENS[1], prompt_len) slots: where a batcher serving a long prompt
  admits. A prefill's attention reads every slot, so the cache matters: a 1,024-token admission timed over 1,536
  slots (its batcher's size) cost 3.2 s, and the line from it to 512 tokens priced a 768-token admission over 1,024
  slots at 2.16 s against 1.70-1.79 measured."""
  from eagle3_jax.config import SlotConfig
  from eagle3_jax.decode import batching, sampling, spec_batching  # deferred: they import autotree lazily

  T, M = prompt_len, 64
  S = max(CACHE_LENS[1], T)
  dtype = target.embed(target_params).dtype
  args = (jnp.zeros((1,), jnp.int32), jnp.ones((1, T), jnp.int32), jnp.full((1,), T, jnp.int32),
          jax.random.split(jax.random.key(0), 1))
  if draft_params is None:
    cfg: Any = SlotConfig(sampling=sampling.SamplingConfig(), max_new_tokens=M)
    params, state = target_params, batching.init_state(target, batch, S, cfg, dtype)
    fn = lambda p, s: batching.admit(p, s, *args, target=target, cfg=cfg)  # noqa: E731
  else:
    cfg = spec_batching.SpecSlotConfig(dcfg=dcfg, spec=speculative.SpecConfig(tree=TreeConfig.chain(1),
                                                                              max_new_tokens=M))
    params = spec_batching.SpecParams(target=target_params, draft=draft_params, vocab=vocab,
                                      embed=target.embed(target_params))
    state = spec_batching.init_state(target, batch, S, cfg, params, dtype)
    fn = lambda p, s: spec_batching.admit(p, s, *args, target=target, cfg=cfg)  # noqa: E731
  return _time_loop(fn, params, state, 1, repeats, decode=False)


def layout_cost(target: protocol.Target, params: Any, *, rows: int, repeats: int = 5) -> float:
  """Seconds of the target's decode layout for `rows` rows a step (xla_cpu.decode_params); 0 where there is none
  (other backends, targets without a layout)."""
  if jax.tree.structure(jax.eval_shape(lambda p: xla_cpu.decode_params(target, p, rows=rows), params)) == \
     jax.tree.structure(params):
    return 0.0  # nothing laid out (the check traces only: no copy made)

  def made(p):  # only what the layout makes: the parameters it passes through cost a call nothing
    out = xla_cpu.decode_params(target, p, rows=rows)
    return {k: v for k, v in out.items() if k not in p} if isinstance(out, dict) and isinstance(p, dict) else out

  fn = jax.jit(made)
  jax.block_until_ready(fn(params))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params))
    best = min(best, time.perf_counter() - t0)
  return best


def machine_key() -> dict:
  """What the costs depend on besides the models: the devices, the host, the software."""
  d = jax.devices()[0]
  cpu = ""
  try:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
  except OSError:
    pass
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "cpus": os.cpu_count(), "cpu": cpu or platform.processor(), "jax": jax.__version__}


def cost_key(target_cfg: Any, dcfg: draft.DraftConfig, *, batch: int, dtype: Any) -> dict:
  return {"format": FORMAT, "version": VERSION, "machine": machine_key(), "target": repr(target_cfg),
          "draft": repr(dcfg), "batch": int(batch), "cache_lens": CACHE_LENS, "prefill_lens": PREFILL_LENS,
          "dtype": str(jnp.dtype(dtype)), "decode_dots": "xla" if xla_cpu.active() else "default"}


def calibrate(target: protocol.Target, target_params: Any, draft_params: Any, vocab: DraftVocab,
              dcfg: draft.DraftConfig, *, batch: int, target_cfg: Any = None, n: int = 8, verbose: bool = False,
              anchors: Sequence[TreeConfig] = (TreeConfig.chain(1), TreeConfig.chain(2), TreeConfig.chain(3),
                                               TreeConfig.chain(4),
                                               TreeConfig(top_k=2, depth=2, total_tokens=4),
                                               TreeConfig(top_k=2, depth=4, total_tokens=8),
                                               TreeConfig(top_k=4, depth=2, total_tokens=6))
              ) -> Costs:
  """Times every part of a round at this batch size (3-11 minutes on 2 CPU cores, much of it compilation), then real
  rounds of the anchors (chains of depth 1-4, two top-2 trees, a top-4 tree): what those cost beyond their parts is
  `extra`. Every chain depth up to 4 is anchored because a round's cost is not linear in depth: at batch 4 real
  chain rounds cost 1.17, 1.30, 1.58 and 2.0 steps at depths 1-4, and parts plus an extra interpolated between
  depths 1 and 4 priced the depth-3 chain 10% under its real round. The top-4 anchor is there because a 4x2x6
  round once cost a third more than its parts and the top-2 trees' extra predicted (BENCHMARKS.md "Tree choice with
  median anchors"): a wider expansion does more than its timed parts show. The decode step is the engine's own (vanilla.decode_step: forward, sampling, bookkeeping) when
  target_cfg (a LlamaConfig) is given, else the bare forward."""
  B, S = batch, CACHE_LENS[0]
  embed = target.embed(target_params)
  dtype = embed.dtype
  t0 = time.perf_counter()
  log = (lambda *a: print("autotree:", *a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)

  def target_pass(T, S=S, start=None, n=n, repeats=3, last_only=False, B=B, keep=None, decode=True):
    start = jnp.full((B,), S // 2, jnp.int32) if start is None else start
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    tmask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    mask = masks.block_mask(start, tmask, S)
    last = jnp.full((B,), T - 1, jnp.int32)

    def fn(params, carry):
      # The argmax feeds the next iteration's tokens: with logits that feed nothing XLA drops the output head,
      # a quarter of a SmolLM2 step (it once did, and every verify cost came out ~10 ms short).
      cache, tokens = carry
      if last_only:  # a prefill needs only each row's last logits
        logits, _, cache = target.last_logits(params, tokens, positions, cache, mask, last)
        nxt = jnp.broadcast_to(jnp.argmax(logits, axis=-1)[:, None], tokens.shape)
      else:
        logits, _, cache = target.forward(params, tokens, positions, cache, mask)
        nxt = jnp.argmax(logits, axis=-1)
      return cache, nxt.astype(jnp.int32)

    cache = target.init_cache(B, S, dtype).replace(lengths=start)
    return _time_loop(fn, target_params, (cache, jnp.ones((B, T), jnp.int32)), n, repeats, keep=keep,
                      prepare=lambda p: xla_cpu.decode_params(target, p, rows=B * T) if decode else p, decode=decode,
                      rows=B * T)

  first_call: dict[str, float] = {}
  retime: list = []  # the step loop, kept compiled to be timed again beside every anchor
  near, far = [], []  # the bare step over both cache lengths, timed again in turn for the slot cost
  step = target_pass(1, keep=near)
  target_pass(1, S=CACHE_LENS[1], keep=far)
  slot = _slot_cost(near[0], far[0])
  if target_cfg is None:
    retime.append(near[0])
  else:
    plain = []
    step = decode_step_cost(target_params, target_cfg, batch=B, cache_len=S, n=n, first=plain, keep=retime)
    first_call["plain"] = plain[0]
  zeros = jnp.zeros((B,), jnp.int32)  # a prompt is written from slot 0
  prefill = {T: target_pass(T, S=max(CACHE_LENS[1], T), start=zeros, n=1, repeats=2, last_only=True)
             for T in PREFILL_LENS}
  # One row under XLA's defaults: how the slot batchers admit, and how plain decoding at batch 1 prefills (its
  # executable keeps the defaults, xla_cpu.compiler_options), ~15% faster at 512 tokens than the few-row options.
  admit = {T: _admit_cost(target, target_params, None, vocab, dcfg, batch=B, prompt_len=T) for T in ADMIT_LENS}
  admit_spec = {T: _admit_cost(target, target_params, draft_params, vocab, dcfg, batch=B, prompt_len=T)
                for T in SPEC_ADMIT_LENS}
  verify, floor, kept = {}, step, {}
  for P in VERIFY_POINTS:  # more tokens through the same weights never cost less: a running max smooths noise
    keep = [] if P in VERIFY_SLOT_POINTS else None
    verify[P] = floor = max(floor, target_pass(P + 1, keep=keep))
    kept.update({P: keep[0]} if keep else {})
  slot_nodes = {}
  for P in VERIFY_SLOT_POINTS:
    far = []
    target_pass(P + 1, S=CACHE_LENS[1], keep=far)
    slot_nodes[P] = _slot_cost(kept[P], far[0])
  log(f"target step {step * 1e3:.1f} ms (+{slot * 1e6:.2f} us a cache slot), prefill",
      {T: round(v * 1e3, 1) for T, v in prefill.items()}, "one row", {T: round(v * 1e3, 1) for T, v in admit.items()},
      "with a draft", {T: round(v * 1e3, 1) for T, v in admit_spec.items()},
      "verify", {P: round(v * 1e3, 1) for P, v in verify.items()},
      "us a slot", {P: round(v * 1e6, 2) for P, v in slot_nodes.items()})

  L = jnp.full((B,), S // 2, jnp.int32)
  dcache = draft.init_cache(dcfg, B, S, dtype).replace(lengths=L)
  hidden = jnp.zeros((B, dcfg.hidden_size), dtype)

  def context_pass(R):
    emb = jnp.zeros((B, R, dcfg.hidden_size), dtype)
    positions = L[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]
    mask = masks.cache_causal_mask(L, R, S)

    def fn(params, carry):
      cache, h = carry
      out, cache = draft.forward(params, emb, h, positions, cache, mask, cfg=dcfg)
      return cache, out.astype(h.dtype)

    return _time_loop(fn, draft_params, (dcache, jnp.zeros((B, R, dcfg.hidden_size), dtype)), n)

  context = {R: context_pass(R) for R in (2, MAX_DEPTH + 1)}

  def expand_pass(k, depth):
    tcfg = TreeConfig(top_k=k, depth=depth, total_tokens=min(k * depth, TreeConfig(
        top_k=k, depth=depth, total_tokens=k).num_candidates))

    def fn(params, carry):
      cache, h = carry
      t, cache = tree.expand(params[0], params[1], params[2], h, cache, dcfg=dcfg, cfg=tcfg)
      return cache, h + t.scores[:, :1].astype(h.dtype) * 0  # keeps the expansion inside the loop

    return _time_loop(fn, (draft_params, embed, vocab), (dcache, hidden), n)

  expand = {k: {d: expand_pass(k, d) for d in EXPAND_DEPTHS} for k in range(1, MAX_TOP_K + 1)}
  layout = layout_cost(target, target_params, rows=B)
  log("context", {R: round(v * 1e3, 2) for R, v in context.items()}, "expand",
      {k: {d: round(v * 1e3, 2) for d, v in e.items()} for k, e in expand.items()}, "layout",
      round(layout * 1e3, 1))
  parts = Costs(step=step, slot=slot, first_call=first_call, prefill=prefill, verify=verify, context=context,
                expand=expand, admit=admit, layout=layout, slot_nodes=slot_nodes, admit_spec=admit_spec)
  extra: dict[str, dict[int, float]] = {}
  meta: dict[str, Any] = {"anchors": []}
  # This shared machine's speed drifts 10-30% within minutes (BENCHMARKS.md "Batch 4 with continuous batching
  # modelled"), and the choice hangs on how a round compares with a plain step. So each anchor round is timed
  # between two timings of the step and kept as its ratio to them, scaled by the median of every step timing.
  # One slow phase during one anchor's timing once set every chain's extra (a 1x4x4 round at 318 ms against 205 ms
  # of parts at batch 4), so every anchor is timed ANCHOR_REPEATS times, interleaved with the others, and its
  # median ratio is kept.
  firsts, again, ratios, steps = {}, {}, {a: [] for a in anchors}, [step]

  def time_anchor(anchor, timed):
    before = retime[0]()
    real = timed()
    after = retime[0]()
    steps.extend([before, after])
    ratios[anchor].append(real / (0.5 * (before + after)))

  for anchor in anchors:
    once, keep = [], []
    time_anchor(anchor, lambda: _round_cost(target, target_params, draft_params, vocab, dcfg, batch=B, cache_len=S,
                                            tcfg=anchor, n=n, first=once, keep=keep))
    firsts[anchor], again[anchor] = once[0], keep[0]
  for _ in range(ANCHOR_REPEATS - 1):
    for anchor in anchors:
      time_anchor(anchor, again[anchor])
  step = float(np.median(steps))
  parts = dataclasses.replace(parts, step=step)
  if target_cfg is not None:  # the slot batcher's own step loop, timed between steps as the anchors are
    loop = _slot_loop(target, target_params, batch=B, cache_len=S)
    loop_ratios = []
    for _ in range(ANCHOR_REPEATS):
      before, real, after = retime[0](), loop(), retime[0]()
      loop_ratios.append(real / (0.5 * (before + after)))
    parts = dataclasses.replace(parts, slot_loop=float(np.median(loop_ratios)))
    meta["slot_loop_ratios"] = loop_ratios
    log(f"slot batcher's step / step ratios {[round(r, 3) for r in loop_ratios]}")
  meta["steps"] = steps
  log(f"step timed {len(steps)} times: {[round(x * 1e3, 1) for x in steps]} ms, median {step * 1e3:.1f} ms")
  for anchor in anchors:
    kind = "chain" if anchor.is_chain else "tree"
    real, first_run = float(np.median(ratios[anchor])) * step, firsts[anchor]
    log(f"anchor {anchor.shape} / step ratios {[round(r, 3) for r in ratios[anchor]]}")
    first_call[kind] = max(first_call.get(kind, 0.0), first_run)
    bare = dataclasses.replace(parts, extra={extra_key(anchor): {1: 0.0}}).round_s(anchor)
    extra.setdefault(extra_key(anchor), {})[anchor.depth] = max(0.0, real - bare)
    meta["anchors"].append({"shape": anchor.shape, "round": real, "parts": bare, "ratios": ratios[anchor]})
    log(f"anchor round {anchor.shape}: {real * 1e3:.1f} ms, parts {bare * 1e3:.1f} ms")
  if "chain" not in extra or not any(key.startswith("tree") for key in extra):
    raise ValueError("calibrate needs a chain and a tree among its anchors")
  if target_cfg is not None:  # the engine's own executables (prefill + loop) pay more on first run than loops do
    first_call = {kind: _engine_first_call(target_params, target_cfg, draft_params, vocab, dcfg, batch=B, tcfg=t)
                  for kind, t in (("plain", None), ("chain", anchors[0]),
                                  ("tree", next(a for a in anchors if not a.is_chain)))}
  first_call.setdefault("plain", min(first_call.values()))
  meta["seconds"] = time.perf_counter() - t0
  log(f"first calls {({k: round(v, 3) for k, v in first_call.items()})} s; calibrated in {meta['seconds']:.0f} s")
  return dataclasses.replace(parts, extra=extra, meta=meta, first_call=first_call)


def _engine_first_call(params, cfg, draft_params, vocab, dcfg, *, batch, tcfg) -> float:
  """What the engine's generator pays on the first run of a new shape beyond a later run (XLA:CPU finishes some
  work there: 0.75 s for SmolLM2's plain decoding on 2 cores), on a dummy batch of 16-token prompts."""
  from eagle3_jax.decode import engine, sampling

  kw = dict(sampling_cfg=sampling.SamplingConfig(), max_new_tokens=8)
  gen = (engine.VanillaGenerator(params, cfg, **kw) if tcfg is None else
         engine.SpeculativeGenerator(params, cfg, draft_params, vocab, dcfg=dcfg, tree_cfg=tcfg, **kw))
  batch_ = engine.Batch(tokens=np.ones((batch, 16), np.int32), lengths=np.full((batch,), 16, np.int32), n_real=batch)
  runs = []
  for _ in range(3):
    t0 = time.perf_counter()
    out = gen.generate(batch_)
    runs.append(time.perf_counter() - t0 - out.stats["compile_s"])
  return max(runs[0] - min(runs[1:]), 0.0)


def decode_step_cost(params, cfg, *, batch, cache_len, n, first, keep=None):
  """Seconds per vanilla.decode_step (greedy), the vanilla engine's loop body; `keep` receives a function that
  times it again (benchmarks re-time the step to follow this machine's drifting speed)."""
  from eagle3_jax.decode import sampling, vanilla
  from eagle3_jax.target import llama

  T, M = 16, cache_len - 16
  kw = dict(target=protocol.llama_target(cfg), sampling_cfg=sampling.SamplingConfig(), max_new_tokens=M)
  state = jax.jit(functools.partial(vanilla.prefill, **kw))(
      params, jnp.ones((batch, T), jnp.int32), jnp.full((batch,), T, jnp.int32),
      llama.init_cache(cfg, batch, cache_len, jax.tree.leaves(params)[0].dtype), jax.random.key(0))
  return _time_loop(lambda p, s: vanilla.decode_step(p, s, **kw), params, state, n, first=first, keep=keep,
                    prepare=lambda p: xla_cpu.decode_params(kw["target"], p, rows=batch), rows=batch)


def _round_cost(target, target_params, draft_params, vocab, dcfg, *, batch, cache_len, tcfg, n, first=None,
                keep=None):
  """Seconds per real spec_round (random prompt, rows kept running so the work per round is constant)."""
  T = 16
  M = cache_len - T - tcfg.total_tokens
  spec = speculative.SpecConfig(tree=tcfg, max_new_tokens=M, cache_len=cache_len)
  embed = target.embed(target_params)
  tokens = jnp.ones((batch, T), jnp.int32)
  lengths = jnp.full((batch,), T, jnp.int32)
  state = speculative.prefill_jit(target, target_params, draft_params, embed, tokens, lengths, jax.random.key(0),
                                  dcfg=dcfg, spec=spec)
  fn = lambda p, s: speculative.spec_round(target, p[0], p[1], p[2], p[3], s, dcfg=dcfg, spec=spec)  # noqa: E731
  return _time_loop(fn, (target_params, draft_params, embed, vocab), state,
                    min(n, max(1, (M - 1) // (tcfg.depth + 1) // 4)), first=first, keep=keep,
                    prepare=lambda p: (xla_cpu.decode_params(target, p[0], rows=batch * (tcfg.total_tokens + 1)),)
                    + tuple(p[1:]))


def cached_costs(target: protocol.Target, target_params: Any, target_cfg: Any, draft_params: Any,
                 vocab: DraftVocab, dcfg: draft.DraftConfig, *, batch: int,
                 cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> Costs:
  """The calibration for this machine, target, draft shape, batch size and dtype: read from cache_dir (default
  ~/.cache/eagle3_jax/autotree) when one was made for exactly these, else measured and saved."""
  from eagle3_jax.target import hf

  dtype = target.embed(target_params).dtype
  key = json.loads(json.dumps(cost_key(target_cfg, dcfg, batch=batch, dtype=dtype)))  # tuples as stored
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  root = pathlib.Path(cache_dir) if cache_dir is not None else hf.cache_root() / "autotree"
  path = root / f"costs-{digest}.json"
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored.get("key") == key:
      return Costs.from_json(stored["costs"])
  costs = calibrate(target, target_params, draft_params, vocab, dcfg, batch=batch, verbose=verbose,
                    target_cfg=target_cfg if hasattr(target_cfg, "num_layers") else None)
  entry = json.dumps({"key": key, "costs": costs.to_json()}, indent=1)
  files.atomic_write(path, lambda tmp: tmp.write_text(entry))  # a killed calibration leaves no half-written entry
  return costs
