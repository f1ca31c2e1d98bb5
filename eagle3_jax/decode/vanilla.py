"""Vanilla autoregressive decoding: bucketed prefill, then one jitted while_loop over a static KV cache."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.decode import sampling, xla_cpu
from eagle3_jax.nn import masks
from eagle3_jax.target.protocol import Target

# Incremented each time `generate` is traced: tests and the engine use it to prove nothing retraces per call.
TRACE_COUNT = {"generate": 0}


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries; the speculative engine mirrors it and adds its draft state.

  Invariants: cache.lengths[b] = tokens of row b in the cache = prompt length + counts[b] - 1, because the
  latest emitted token (`last`) is fed to the target only on the next step. tokens[b, :counts[b]] are the
  emitted tokens (a stop token included); the rest hold pad_id.
  """

  cache: Any  # the target's cache (a KVCache for the Llama family)
  last: jax.Array  # int32[B] latest emitted token, not yet in the cache
  tokens: jax.Array  # int32[B, M] output buffer, M = max_new_tokens
  counts: jax.Array  # int32[B] emitted tokens per row
  done: jax.Array  # bool[B] row hit a stop id or max_new_tokens
  key: jax.Array  # PRNG key, split once per step
  steps: jax.Array  # int32[] target forward passes after prefill (the loop's trip count)


def cache_length(bucket: int, max_new_tokens: int) -> int:
  """Cache slots for a prompt bucket: the padded prefill writes `bucket` slots, decoding appends the rest."""
  return bucket + max_new_tokens


def validate_prompts(tokens_BT: Any, lengths_B: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Shape, emptiness and id-range checks shared by the vanilla and speculative entry points; host arrays back."""
  tokens_BT, lengths_B = np.asarray(tokens_BT), np.asarray(lengths_B)
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens must be [B, T], got shape {tokens_BT.shape}")
  B, T = tokens_BT.shape
  if lengths_B.shape != (B,):
    raise ValueError(f"lengths must be [B]={B}, got shape {lengths_B.shape}")
  if (lengths_B < 1).any():
    raise ValueError(f"empty prompt in rows {np.flatnonzero(lengths_B < 1).tolist()}: every row needs >= 1 token")
  if (lengths_B > T).any():
    raise ValueError(f"lengths {lengths_B.tolist()} exceed the padded prompt length T={T}")
  if ((tokens_BT < 0) | (tokens_BT >= vocab_size)).any():
    raise ValueError(f"token ids must lie in [0, {vocab_size})")
  return tokens_BT, lengths_B


def validate(tokens_BT: np.ndarray, lengths_B: np.ndarray, *, target: Target, cache_len: int,
             max_new_tokens: int) -> None:
  """Host-side checks with clear errors (inside jit these would silently write outside the cache)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokens_BT, lengths_B = validate_prompts(tokens_BT, lengths_B, target.vocab_size)
  T = tokens_BT.shape[1]
  longest = int(lengths_B.max())
  if T + max_new_tokens > cache_len:
    raise ValueError(f"padded prompt T={T} + max_new_tokens={max_new_tokens} = {T + max_new_tokens} exceeds the "
                     f"KV cache length {cache_len}")
  if longest + max_new_tokens > target.max_positions:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                     f"max_position_embeddings={target.max_positions}")


def emit(state: Any, new_B: jax.Array, *, max_new_tokens: int, stop_ids: tuple[int, ...]) -> Any:
  """Appends new_B to every row that is not done; the rows it finishes stop here (the stop token is kept)."""
  active = ~state.done
  M = state.tokens.shape[1]
  at_count = (jnp.arange(M)[None, :] == state.counts[:, None]) & active[:, None]
  tokens = jnp.where(at_count, new_B[:, None], state.tokens)
  counts = state.counts + active.astype(jnp.int32)
  stopped = jnp.isin(new_B, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros_like(active)
  done = state.done | (active & stopped) | (counts >= max_new_tokens)
  return state.replace(tokens=tokens, counts=counts, done=done, last=jnp.where(active, new_B, state.last))


def prefill(params: Any, tokens_BT: jax.Array, lengths_B: jax.Array, cache: Any, key: jax.Array, *,
            target: Target, sampling_cfg: sampling.SamplingConfig, max_new_tokens: int,
            stop_ids: tuple[int, ...] = (), pad_id: int = 0) -> DecodeState:
  """Runs right-padded prompts [B,T] through the target and samples each row's first token."""
  B, T = tokens_BT.shape
  with jax.named_scope("prefill"):
    cache = cache.replace(lengths=jnp.zeros((B,), jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # Padded queries (t >= length) write junk K/V past the prompt; decoding overwrites those slots before any
    # query can see them, because a query at slot s only sees slots <= s.
    mask = masks.cache_causal_mask(cache.lengths, T, target.cache_slots(cache))
    # Only each row's last prompt position needs logits: [B,T,V] would cost T x 49152 x 4 bytes per row.
    logits, _, cache = target.last_logits(params, tokens_BT, positions, cache, mask, lengths_B - 1)
  key, first = sampling.split_sample(key, logits, sampling_cfg)
  state = DecodeState(cache=cache.replace(lengths=lengths_B.astype(jnp.int32)), last=first,
                      tokens=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
                      counts=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), jnp.bool_), key=key,
                      steps=jnp.zeros((), jnp.int32))
  return emit(state, first, max_new_tokens=max_new_tokens, stop_ids=stop_ids)


def decode_step(params: Any, state: DecodeState, *, target: Target, sampling_cfg: sampling.SamplingConfig,
                max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> DecodeState:
  """Feeds each row's latest token at position cache.lengths[b] and emits one more token per active row."""
  with jax.named_scope("decode_step"):
    cache = state.cache
    positions = cache.lengths[:, None]
    mask = masks.cache_causal_mask(cache.lengths, 1, target.cache_slots(cache))
    logits, _, cache = target.last_logits(params, state.last[:, None], positions, cache, mask,
                                          jnp.zeros_like(cache.lengths))
    key, new = sampling.split_sample(state.key, logits, sampling_cfg)
    # Finished rows keep their length: their (ignored) K/V keeps landing on one slot, so the cache never overflows.
    cache = cache.replace(lengths=cache.lengths + (~state.done).astype(jnp.int32))
    state = state.replace(cache=cache, key=key, steps=state.steps + 1)
    return emit(state, new, max_new_tokens=max_new_tokens, stop_ids=stop_ids)


def decode_loop(params: Any, state: DecodeState, *, target: Target, sampling_cfg: sampling.SamplingConfig,
                max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> DecodeState:
  """Steps until every row is done; static trip bound max_new_tokens - 1, no host round trip per token."""
  step = functools.partial(decode_step, params, target=target, sampling_cfg=sampling_cfg,
                           max_new_tokens=max_new_tokens, stop_ids=stop_ids)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)


def generate(params: Any, tokens_BT: jax.Array, lengths_B: jax.Array, cache: Any, key: jax.Array, *,
             target: Target, sampling_cfg: sampling.SamplingConfig, max_new_tokens: int,
             stop_ids: tuple[int, ...] = (), pad_id: int = 0) -> DecodeState:
  """Prefill + decode loop for a batch of right-padded prompts; returns the final state (tokens, counts, key).

  Unjitted; use `generate_jit` (cache donated) after `validate`, or the engine, which does both.
  """
  TRACE_COUNT["generate"] += 1
  params = xla_cpu.decode_params(target, params, rows=tokens_BT.shape[0])
  kw = dict(target=target, sampling_cfg=sampling_cfg, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
  state = prefill(params, tokens_BT, lengths_B, cache, key, pad_id=pad_id, **kw)
  return decode_loop(params, state, **kw)


generate_jit = jax.jit(generate, static_argnames=("target", "sampling_cfg", "max_new_tokens", "stop_ids", "pad_id"),
                       donate_argnames=("cache",))
