"""Continuous batching for speculative decoding: the slot kernel behind `batching.ContinuousBatcher(draft=...)`.

The host loop is batching.py's. What differs is the state (speculative.SpecState with one PRNG key per slot), the
admission (speculative.prefill of K requests into caches of the pool's size, written into their slots together with
their pending draft rows), the loop (draft-verify rounds instead of decode steps) and resizing (the target's and the
draft's caches are both padded or cut). Ragged acceptance needs nothing new: speculative.py already keeps each row's
cache lengths, pending rows, counts and stop state apart, and a finished or free row's writes land where nothing
reads them. A slot's `rounds` and `accepted` restart at admission, so tau is counted per request.

Each request samples with its own key (fold_in(seed, request index)): the first token at admission, then every
round's acceptance splits the slot's key, so a request's tokens do not depend on its slot or its neighbours.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from eagle3_jax.config import SpecSlotConfig
from eagle3_jax.decode import speculative, xla_cpu
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.nn import kv_cache
from eagle3_jax.target.protocol import Target

TRACE_COUNT = {"admit": 0, "rounds": 0, "resize": 0}


@flax.struct.dataclass
class SpecParams:
  """What every slot executable reads: the target's weights, the draft's, the embedding the draft uses, its vocab."""

  target: Any
  draft: Any
  embed: jax.Array  # [V, D]
  vocab: DraftVocab


def final_len(bucket: int, cfg: SpecSlotConfig) -> int:
  """Slots of both caches a request of this prompt bucket needs by its last round (what a lone batch allocates)."""
  return max(cfg.spec.cache_lengths(bucket))


def init_state(target: Target, slots: int, cache_len: int, cfg: SpecSlotConfig, params: SpecParams,
               dtype: Any = jnp.float32) -> speculative.SpecState:
  """B free slots (done, lengths 0) over empty target and draft caches of cache_len slots."""
  R, M, pad = cfg.spec.rows, cfg.spec.max_new_tokens, cfg.spec.pad_id
  zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
  hidden_dtype = jax.tree.leaves(params.draft)[0].dtype
  return speculative.SpecState(
      cache=target.init_cache(slots, cache_len, dtype), draft_cache=draft.init_cache(cfg.dcfg, slots, cache_len, dtype),
      pending_hidden=jnp.zeros((slots, R, cfg.dcfg.hidden_size), hidden_dtype),
      pending_tokens=jnp.full((slots, R), pad, jnp.int32), pending_count=jnp.ones((slots,), jnp.int32),
      tokens=jnp.full((slots, M + R), pad, jnp.int32), counts=zeros(), done=jnp.ones((slots,), jnp.bool_),
      key=jax.random.split(jax.random.key(0), slots), rounds=zeros(), accepted=zeros(), steps=jnp.zeros((), jnp.int32))


def admit(params: SpecParams, state: speculative.SpecState, slots_K: jax.Array, tokens_KT: jax.Array,
          lengths_K: jax.Array, keys_K: jax.Array, *, target: Target,
          cfg: SpecSlotConfig) -> speculative.SpecState:
  """Prefills K requests ([K, T], right-padded) and writes each whole row (both caches over all their slots, pending
  draft rows, first token, key, fresh round counts) into its slot; rows whose slot is >= B are padding, dropped."""
  TRACE_COUNT["admit"] += 1
  S = target.cache_slots(state.cache)
  rows = speculative.prefill(target, params.target, params.draft, params.embed, tokens_KT, lengths_K, keys_K,
                             dcfg=cfg.dcfg, spec=cfg.spec, cache_lens=(S, state.draft_cache.max_len))
  put = lambda big, new: big.at[slots_K].set(new.astype(big.dtype), mode="drop")  # noqa: E731
  keys = jax.random.wrap_key_data(put(jax.random.key_data(state.key), jax.random.key_data(rows.key)))
  merged = jax.tree.map(put, state.replace(key=None, steps=None), rows.replace(key=None, steps=None))
  return merged.replace(key=keys, steps=state.steps)


def run_rounds(params: SpecParams, state: speculative.SpecState, n: jax.Array, *, target: Target,
               cfg: SpecSlotConfig) -> speculative.SpecState:
  """Up to n draft-verify rounds over every slot, fewer if all are done first; no host round trip inside."""
  TRACE_COUNT["rounds"] += 1
  params = params.replace(target=xla_cpu.decode_params(
      target, params.target, rows=state.done.shape[0] * (cfg.spec.tree.total_tokens + 1)))
  body = lambda c: (c[0] + 1, speculative.spec_round(  # noqa: E731
      target, params.target, params.draft, params.embed, params.vocab, c[1], dcfg=cfg.dcfg, spec=cfg.spec))
  return jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[1].done), body, (jnp.zeros((), jnp.int32), state))[1]


def resize(params: SpecParams, state: speculative.SpecState, *, target: Target, cfg: SpecSlotConfig,
           cache_len: int) -> speculative.SpecState:
  """The same slots over caches of cache_len slots (both padded with empty slots at the end, or cut)."""
  del params, cfg
  TRACE_COUNT["resize"] += 1

  return state.replace(cache=kv_cache.resize_slots(state.cache, cache_len, target.slot_axis),
                       draft_cache=kv_cache.resize_slots(state.draft_cache, cache_len, kv_cache.SLOT_AXIS))


admit_jit = jax.jit(admit, static_argnames=("target", "cfg"), donate_argnames=("state",))
resize_jit = jax.jit(resize, static_argnames=("target", "cfg", "cache_len"))
run_rounds_jit = jax.jit(run_rounds, static_argnames=("target", "cfg"), donate_argnames=("state",))
