"""Continuous batching for plain decoding: B decode slots under static shapes, refilled as requests finish.

Static batching pads every prompt of a batch to its longest one and keeps finished rows idle until the slowest row
ends. Here a request is admitted into a free slot on its own (prefilled alone at its length bucket, then written
into that slot's rows of the running state), the jitted loop runs `sync_every` steps over all slots, and the host
collects the rows that finished and admits waiting requests into their slots. Admission is one executable per
prompt bucket with the slot as data, so nothing recompiles per admission.

Attention reads every cache slot whatever the mask (static shapes), so the cache length S is what each step costs
beyond the weights (on 2 CPU cores at batch 16, ~0.13 ms a slot on a ~110 ms step). S follows what the running
requests need through the next chunk: each one's prompt bucket, the tokens it has emitted so far and what a chunk can
add (`slot_need`), never more than it needs at its end, on a ladder of sizes (`cache_size`: 2^k and 3 * 2^(k-1),
so few executables). Sized instead by every request's final need (bucket + max_new_tokens, to a power of two), S
sat at 512-1024 slots for 256-token answers while static batches step over bucket + 256 (~300-400): continuous
batching's 23% fewer steps at batch 16 were eaten by 22% dearer ones (BENCHMARKS.md "Continuous batching: 256
prompts x 256 tokens, the whole table"). When a row or an admission needs more, the running state grows (its cache
is padded with empty slots) rather than draining; when less is needed, it shrinks (cut to its first S slots,
exact for every running row). Either way slots stay busy across the change, and there is one resize executable per
pair of sizes. Requests are admitted in prompt-length order
(`admit_order`): longest first (the default) starts big, prefills the long prompts while every slot is busy, and
shrinks S as the long requests finish, so the tail of a run steps over a small cache; shortest first only ever grows
S, and its last wave, with slots emptying, steps over the largest cache (1.17x slower on a short/long mix, equal on
chat prompts: BENCHMARKS.md "Admission order on 256 x 256").

The target's decode layout (decode/xla_cpu.py: a 113 MB [D, V] head copy for SmolLM2 on XLA:CPU) is made once per
batcher, at its first chunk, and kept: made inside the step loop's executable, it was paid at every chunk (~6% of
a batch-4 chunk).

Each request carries its own PRNG key (fold_in(seed, request index)), split once per step, so its tokens do not
depend on the slot it lands in or on what runs beside it: greedy or sampled, a request decodes as it would alone.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.config import SlotConfig
from eagle3_jax.decode import sampling, spec_batching, speculative, vanilla, xla_cpu
from eagle3_jax.nn import kv_cache, masks
from eagle3_jax.target import protocol
from eagle3_jax.target.protocol import Target

# Incremented on every trace: tests prove that admissions and step chunks compile once per shape.
TRACE_COUNT = {"admit": 0, "steps": 0, "resize": 0}
ADMIT_ORDERS = ("longest", "shortest")  # prompt-length order of admissions
DEFAULT_ADMIT_ORDER = "longest"


@flax.struct.dataclass
class SlotState:
  """The running slots. A free slot is `done`; its (ignored) writes land on one cache slot, as for finished rows."""

  cache: Any  # the target's cache, B rows of S slots
  last: jax.Array  # int32[B] latest emitted token, not yet in the cache
  tokens: jax.Array  # int32[B, M] emitted tokens, pad_id after counts
  counts: jax.Array  # int32[B]
  done: jax.Array  # bool[B]
  keys: jax.Array  # [B] one PRNG key per slot (its request's), split every step
  steps: jax.Array  # int32[] decode steps run (all slots together)


def init_state(target: Target, slots: int, cache_len: int, cfg: SlotConfig, dtype: Any = jnp.float32) -> SlotState:
  """B free slots over an empty cache of cache_len slots per row."""
  return SlotState(cache=target.init_cache(slots, cache_len, dtype), last=jnp.zeros((slots,), jnp.int32),
                   tokens=jnp.full((slots, cfg.max_new_tokens), cfg.pad_id, jnp.int32),
                   counts=jnp.zeros((slots,), jnp.int32), done=jnp.ones((slots,), jnp.bool_),
                   keys=jax.random.split(jax.random.key(0), slots), steps=jnp.zeros((), jnp.int32))


def admit(params: Any, state: SlotState, slots_K: jax.Array, tokens_KT: jax.Array, lengths_K: jax.Array,
          keys_K: jax.Array, *, target: Target, cfg: SlotConfig) -> SlotState:
  """Prefills K requests ([K, T], right-padded) together and writes each, with its first token, into its slot.

  One pass reads the weights once for all K (a short prompt's prefill is as memory-bound as a decode step). Rows
  whose slot is out of range (>= B) are padding: their writes are dropped. Each row samples with its own key.
  """
  TRACE_COUNT["admit"] += 1
  K, T = tokens_KT.shape
  dtype = jax.tree.leaves(state.cache)[0].dtype
  cache = target.init_cache(K, target.cache_slots(state.cache), dtype)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (K, T))
  mask = masks.cache_causal_mask(jnp.zeros((K,), jnp.int32), T, target.cache_slots(cache))
  logits, _, cache = target.last_logits(params, tokens_KT, positions, cache, mask, lengths_K - 1)
  keys_K, first = sampling.split_sample(keys_K, logits, cfg.sampling)  # as vanilla.prefill, per row
  rows = SlotState(cache=cache.replace(lengths=lengths_K.astype(jnp.int32)), last=first,
                   tokens=jnp.full((K, cfg.max_new_tokens), cfg.pad_id, jnp.int32),
                   counts=jnp.zeros((K,), jnp.int32), done=jnp.zeros((K,), jnp.bool_), keys=keys_K,
                   steps=state.steps)
  rows = vanilla.emit(rows, first, max_new_tokens=cfg.max_new_tokens, stop_ids=cfg.stop_ids)
  put = lambda big, new: big.at[slots_K].set(new.astype(big.dtype), mode="drop")  # noqa: E731
  keys = jax.random.wrap_key_data(put(jax.random.key_data(state.keys), jax.random.key_data(rows.keys)))
  return state.replace(cache=jax.tree.map(put, state.cache, rows.cache), last=put(state.last, rows.last),
                       tokens=put(state.tokens, rows.tokens), counts=put(state.counts, rows.counts),
                       done=put(state.done, rows.done), keys=keys)


def step(params: Any, state: SlotState, *, target: Target, cfg: SlotConfig) -> SlotState:
  """One decode step of every slot, each row sampling with its own key (as vanilla.decode_step otherwise)."""
  cache = state.cache
  mask = masks.cache_causal_mask(cache.lengths, 1, target.cache_slots(cache))
  logits, _, cache = target.last_logits(params, state.last[:, None], cache.lengths[:, None], cache, mask,
                                        jnp.zeros_like(cache.lengths))
  keys, new = sampling.split_sample(state.keys, logits, cfg.sampling)
  cache = cache.replace(lengths=cache.lengths + (~state.done).astype(jnp.int32))
  state = state.replace(cache=cache, keys=keys, steps=state.steps + 1)
  return vanilla.emit(state, new, max_new_tokens=cfg.max_new_tokens, stop_ids=cfg.stop_ids)


def run_steps(params: Any, state: SlotState, n: jax.Array, *, target: Target, cfg: SlotConfig) -> SlotState:
  """Up to n steps, fewer if every slot is done first; no host round trip inside. params are best already in the
  decode layout (the batcher keeps them so); otherwise it is made here, at every call."""
  TRACE_COUNT["steps"] += 1
  params = xla_cpu.decode_params(target, params, rows=state.done.shape[0])
  body = lambda c: (c[0] + 1, step(params, c[1], target=target, cfg=cfg))  # noqa: E731
  return jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[1].done), body, (jnp.zeros((), jnp.int32), state))[1]


def resize(params: Any, state: SlotState, *, target: Target, cfg: SlotConfig, cache_len: int) -> SlotState:
  """The same slots over a cache of cache_len slots: every rank >= 2 leaf padded with empty slots at the end, or cut
  (exact for every running row: the host cuts no shorter than what its longest running request needs)."""
  del params, cfg  # the signature every slot executable shares
  TRACE_COUNT["resize"] += 1

  return state.replace(cache=kv_cache.resize_slots(state.cache, cache_len, target.slot_axis))


admit_jit = jax.jit(admit, static_argnames=("target", "cfg"), donate_argnames=("state",))
resize_jit = jax.jit(resize, static_argnames=("target", "cfg", "cache_len"))  # new shapes: nothing to donate to
run_steps_jit = jax.jit(run_steps, static_argnames=("target", "cfg"), donate_argnames=("state",))


MIN_CACHE = 16  # the smallest slot cache (as the smallest prompt bucket)


def cache_size(n: float) -> int:
  """Slots of a running cache that must hold n: the smallest 2^k or 3 * 2^(k-1) >= n (at least MIN_CACHE), so at
  most a third of it is unused and sizes stay few (one step loop and a few resizes each)."""
  from eagle3_jax.decode.engine import bucket_length  # deferred: engine imports this module lazily too

  return bucket_length(math.ceil(n), minimum=MIN_CACHE)


def final_len(bucket: int, max_new_tokens: int) -> int:
  """Cache slots a request of this prompt bucket needs by its last step (what a lone static batch allocates)."""
  return vanilla.cache_length(bucket, max_new_tokens)


def slot_need(final: int, max_new_tokens: int, emitted: float, growth: int) -> float:
  """Slots a running request needs through the next chunk: its final need less the tokens it has not yet emitted,
  plus what one chunk can add (`growth`), and never more than the final need."""
  return min(final, final - max_new_tokens + emitted + growth)


class ContinuousBatcher:
  """Serves a list of prompts through `slots` decode slots; results come back per request as each finishes.

  `sync_every` steps run between host visits: fewer visits cost less dispatch, more let finished slots idle.
  `admit_group` requests at most are prefilled together (padded to a power of two): one weight read for several
  short prompts, but more executables, and on XLA:CPU each pays a one-time cost on its first run (~0.5 s for
  SmolLM2); 1 measured fastest on 2 CPU cores (BENCHMARKS.md "Continuous batching"). `admit_order` "longest" (the
  default) or "shortest" prompts first (module docstring).
  engine.Engine drives it like a Generator (`continuous` tells it to hand over every prompt at once).

  With `draft_params` (and vocab, dcfg, tree_cfg, optionally the draft's own embedding) the slots run EAGLE-3
  draft-verify rounds instead of decode steps (decode/spec_batching.py); `sync_every` then counts rounds, the
  stats add `rounds` and `accepted` (tau = accepted / rounds over all requests), and each request's own rounds and
  tau come with it to `on_result`.
  """

  continuous = True

  def __init__(self, params: Any, target: Any, *, slots: int, sampling_cfg: sampling.SamplingConfig,
               max_new_tokens: int, stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
               sync_every: int = 16, admit_group: int = 1, bucket_fn: Callable[[int], int] | None = None,
               admit_order: str = DEFAULT_ADMIT_ORDER,
               draft_params: Any = None, vocab: Any = None, dcfg: Any = None, tree_cfg: Any = None,
               embed: Any = None):
    if min(slots, sync_every, max_new_tokens, admit_group) < 1:
      raise ValueError(f"slots, sync_every, max_new_tokens and admit_group must be >= 1, got {slots}, {sync_every}, "
                       f"{max_new_tokens}, {admit_group}")
    if admit_order not in ADMIT_ORDERS:
      raise ValueError(f"admit_order must be one of {ADMIT_ORDERS}, got {admit_order!r}")
    from eagle3_jax.decode.engine import bucket_length  # the engine's buckets, so both pad alike

    self.params, self.slots, self.sync_every, self.seed = params, slots, sync_every, seed
    self.admit_group, self.admit_order = admit_group, admit_order
    self.target = protocol.as_target(target)
    self.max_new_tokens = max_new_tokens
    stop_ids = tuple(sorted(set(int(i) for i in stop_ids)))
    self.bucket_fn = bucket_fn or bucket_length
    self._dtype = jax.tree.leaves(params)[0].dtype
    self._compiled: dict[tuple, Any] = {}
    self.speculative = draft_params is not None
    if not self.speculative:
      self.cfg: Any = SlotConfig(sampling=sampling_cfg, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                                 pad_id=int(pad_id))
      self._params, self._fns = params, {"admit": admit_jit, "steps": run_steps_jit, "resize": resize_jit}
      self._layout_rows = slots
      self._final = lambda T: final_len(T, max_new_tokens)  # noqa: E731
      self._growth = sync_every  # a step emits one token
      self._init = lambda S: init_state(self.target, slots, S, self.cfg, self._dtype)  # noqa: E731
    else:
      if vocab is None or dcfg is None or tree_cfg is None:
        raise ValueError("speculative continuous batching needs draft_params, vocab, dcfg and tree_cfg")
      self.cfg = spec_batching.SpecSlotConfig(dcfg=dcfg, spec=speculative.SpecConfig(
          tree=tree_cfg, sampling=sampling_cfg, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=int(pad_id)))
      self._params = spec_batching.SpecParams(target=params, draft=draft_params, vocab=vocab,
                                              embed=self.target.embed(params) if embed is None else embed)
      self._fns = {"admit": spec_batching.admit_jit, "steps": spec_batching.run_rounds_jit,
                   "resize": spec_batching.resize_jit}
      self._layout_rows = slots * (tree_cfg.total_tokens + 1)
      self._final = lambda T: spec_batching.final_len(T, self.cfg)  # noqa: E731
      self._growth = sync_every * (tree_cfg.depth + 1)  # a round emits at most depth + 1 tokens
      self._init = lambda S: spec_batching.init_state(  # noqa: E731
          self.target, slots, S, self.cfg, self._params, self._dtype)
    self._laid = xla_cpu.KeptLayouts(self.target, params)  # the decode layout, made at the first chunk and kept
    self._traces_at_start = self._traces()

  def _traces(self) -> int:
    return sum(TRACE_COUNT.values()) + sum(spec_batching.TRACE_COUNT.values())

  @property
  def compile_count(self) -> int:
    return self._traces() - self._traces_at_start

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.cfg.spec.stop_ids if self.speculative else self.cfg.stop_ids

  def reseed(self, seed: int) -> None:
    """Request i of the next run samples with fold_in(seed, i) (regeneration reseeds per chunk)."""
    self.seed = seed

  def _step_params(self) -> Any:
    """What the step loops read: the target's params in their decode layout (made once, `_laid`)."""
    laid = self._laid(self._layout_rows)
    return self._params.replace(target=laid) if self.speculative else laid

  def _call(self, kind: str, S: int, T: int | None, stats: dict, *args, **static) -> SlotState:
    """Runs the executable of (kind, S, T), compiling it on first use (its seconds go to stats['compile_s'])."""
    key = (kind, S, T)
    # Admissions are prefills and read the params as given; the loops read the kept decode layout, made once, at
    # the first chunk (as a static generator makes it in its first batch).
    params = self._step_params() if kind == "steps" else self._params
    if key not in self._compiled:
      # Calls are dispatched without waiting: wait for the work already queued, or its run time would overlap the
      # compilation and be subtracted with it (a first run with fresh compiles read 8 s where warm runs read 11).
      jax.block_until_ready(args)
      t0 = time.perf_counter()
      # Admissions are prefills: only the decode loops take the few-row settings (decode/xla_cpu.py).
      options = xla_cpu.compiler_options(rows=self.slots * (2 if self.speculative else 1)) if kind == "steps" else None
      self._compiled[key] = self._fns[kind].lower(params, *args, target=self.target, cfg=self.cfg,
                                                  **static).compile(options)
      stats["compile_s"] += time.perf_counter() - t0
    return self._compiled[key](params, *args)

  def run(self, prompt_ids: Sequence[Sequence[int]],
          on_result: Callable[[int, list[int], dict[str, float]], None] | None = None
          ) -> tuple[list[list[int]], dict[str, float]]:
    """Token ids per request (stop token kept) and stats: steps, slot_steps, tokens, compile_s, seconds (excluding
    compilation), utilisation (share of slot-steps, or slot-rounds, that served a request), and for speculative
    decoding rounds and accepted (tokens, bonus included, over those rounds).
    on_result(index, ids, request_stats) is called as each request finishes; request_stats holds that request's
    rounds and tau with a draft, nothing without."""
    n = len(prompt_ids)
    for i, p in enumerate(prompt_ids):
      if len(p) < 1:
        raise ValueError(f"request {i} is an empty prompt")
    # pop() gives the shortest (or the longest) prompt
    queue = sorted(range(n), key=lambda i: len(prompt_ids[i]), reverse=self.admit_order == "shortest")
    if not queue:
      return [], {"steps": 0.0, "slot_steps": 0.0, "tokens": 0.0, "compile_s": 0.0, "admissions": 0.0,
                  "seconds": 0.0, "utilisation": 0.0}
    longest = max(len(p) for p in prompt_ids)
    probe = np.ones((1, self.bucket_fn(longest)), np.int32), np.array([longest])
    if self.speculative:
      p = self._params
      speculative.validate(self.target, p.target, p.draft, p.vocab, *probe, p.embed, dcfg=self.cfg.dcfg,
                           spec=self.cfg.spec)
    else:
      vanilla.validate(*probe, target=self.target, cache_len=cache_size(self._final(self.bucket_fn(longest))),
                       max_new_tokens=self.max_new_tokens)
    results: list[list[int] | None] = [None] * n
    stats = {"steps": 0.0, "slot_steps": 0.0, "tokens": 0.0, "step_tokens": 0.0, "compile_s": 0.0,
             "admissions": 0.0, "grows": 0.0, "shrinks": 0.0} | (
                 {"rounds": 0.0, "accepted": 0.0} if self.speculative else {})
    t_start = time.perf_counter()
    final = [self._final(self.bucket_fn(len(p))) for p in prompt_ids]  # cache slots each request ends with
    need = lambda i, e: slot_need(final[i], self.max_new_tokens, e, self._growth)  # noqa: E731  (e tokens emitted)
    S = cache_size(need(queue[-1], 1))
    state = self._init(S)
    owner: list[int | None] = [None] * self.slots  # request index held by each slot
    emitted = [0] * self.slots  # tokens its request had emitted at the last host visit
    n_steps, steps = jnp.asarray(self.sync_every, jnp.int32), 0
    while queue or any(o is not None for o in owner):
      free = [slot for slot in range(self.slots) if owner[slot] is None][:len(queue)]
      while free:  # admitted in groups: one prefill pass per group, K padded to a power of two (few shapes)
        group, free = free[:self.admit_group], free[self.admit_group:]
        take = [queue.pop() for _ in group]
        T = self.bucket_fn(max(len(prompt_ids[i]) for i in take))
        size = cache_size(max(need(i, 1) for i in take))  # >= T: the prefill writes T slots
        if size > S:
          state = self._call("resize", S, size, stats, state, cache_len=size)
          S, stats["grows"] = size, stats["grows"] + 1
        K = 1 << (len(take) - 1).bit_length()
        tokens = np.full((K, T), self.cfg.pad_id, np.int32)
        lengths = np.ones((K,), np.int32)
        slots = np.full((K,), self.slots, np.int32)  # out of range: padding rows, dropped
        for r, (slot, i) in enumerate(zip(group, take)):
          tokens[r, :len(prompt_ids[i])] = prompt_ids[i]
          lengths[r], slots[r], owner[slot], emitted[slot] = len(prompt_ids[i]), slot, i, 1
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.seed), i))(
            jnp.asarray([*take, *take[:1] * (K - len(take))], jnp.uint32))
        state = self._call("admit", S, (T, K), stats, state, slots, tokens, lengths, keys)
        stats["admissions"] += len(take)
      # The cache the running requests need through the next chunk, and the next queued one at its admission:
      # grown as rows get longer, cut as long ones finish (never below a running row's need, so no row loses a slot
      # it will write, nor below the next admission's, so it is not grown straight back).
      want = cache_size(max([need(i, emitted[s]) for s, i in enumerate(owner) if i is not None]
                            + ([need(queue[-1], 1)] if queue else [])))
      if want != S:
        state = self._call("resize", S, want, stats, state, cache_len=want)
        stats["grows" if want > S else "shrinks"] += 1
        S = want
      state = self._call("steps", S, None, stats, state, n_steps)
      done, counts, now = jax.device_get((state.done, state.counts, state.steps))
      emitted = [int(c) for c in counts]
      stats["steps"] += int(now) - steps
      stats["slot_steps"] += (int(now) - steps) * self.slots
      steps = int(now)
      finished = [s for s in range(self.slots) if owner[s] is not None and done[s]]
      if finished:
        rows = jax.device_get(state.tokens)
        rounds, accepted = jax.device_get((state.rounds, state.accepted)) if self.speculative else (None, None)
        for s in finished:
          i, owner[s] = owner[s], None
          results[i] = [int(t) for t in rows[s, :int(counts[s])]]
          stats["tokens"] += len(results[i])
          stats["step_tokens"] += len(results[i]) - 1  # the first came from the prefill
          request: dict[str, float] = {}
          if self.speculative:
            stats["rounds"] += float(rounds[s])
            stats["accepted"] += float(accepted[s])
            request = {"rounds": float(rounds[s]), "tau": float(accepted[s] / max(rounds[s], 1))}
          if on_result is not None:
            on_result(i, results[i], request)
    stats["seconds"] = time.perf_counter() - t_start - stats["compile_s"]
    # Share of slots x steps (rounds) that served a request: idle and finished-but-uncollected slots count.
    busy = stats["rounds"] if self.speculative else stats["step_tokens"]
    stats["utilisation"] = busy / max(stats["slot_steps"], 1.0)
    return results, stats  # type: ignore[return-value]
