"""The static-shape KV cache of target and draft: its type, slot axis, row writes and the commit of accepted slots."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

SLOT_AXIS = 2  # of every [B,K,S,H] cache buffer
AXES = ("batch", "kv_heads", "cache_seq", "head_dim")  # logical axes of every buffer (sharding rules)


@flax.struct.dataclass
class KVCache:
  """Static-shape KV cache: one [B,K,S,H] array per layer; `lengths[b]` = committed tokens of row b.

  New tokens are always written at slots lengths[b] + t; forward never moves `lengths` (the caller commits).
  Slot index == position for committed tokens, so masks can be built from slot indices alone.
  Head-major (slots on axis 2, SLOT_AXIS) so attention reads each head's keys as one contiguous [S,H] matrix:
  slot-major [B,S,K,H] made XLA:CPU transpose every layer's cache on every call (measured 38 -> 10 ms of attention
  per SmolLM2 decode step at S = 2048).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array  # int32[B]

  @property
  def max_len(self) -> int:
    return self.k[0].shape[SLOT_AXIS]


def init(num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype=jnp.float32) -> KVCache:
  """An empty cache (all lengths 0) of num_layers [B,K,S,H] buffers for keys and as many for values."""
  shape = (batch, num_kv_heads, max_len, head_dim)
  return KVCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                 v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                 lengths=jnp.zeros((batch,), jnp.int32))


def axes(num_layers: int) -> KVCache:
  """The logical axes of a num_layers cache, as a KVCache of axis tuples."""
  return KVCache(k=(AXES,) * num_layers, v=(AXES,) * num_layers, lengths=("batch",))


def write_rows(buf_BKSH: jax.Array, new_BTKH: jax.Array, starts_B: jax.Array) -> jax.Array:
  """Writes new_BTKH[b] at slots starts[b].. of row b (in place when the buffer is donated)."""
  new_BKTH = jnp.swapaxes(new_BTKH, 1, 2).astype(buf_BKSH.dtype)
  return jax.vmap(lambda buf, new, s: jax.lax.dynamic_update_slice(buf, new, (0, s, 0)))(buf_BKSH, new_BKTH, starts_B)


def slots(cache: Any, slot_axis: int = 1) -> int:
  """S of a protocol cache: the slot axis of its first rank >= 2 leaf."""
  return next(x.shape[slot_axis] for x in jax.tree.leaves(cache) if x.ndim >= 2)


def resize_slots(cache: Any, cache_len: int, slot_axis: int = 1) -> Any:
  """The same cache over cache_len slots: every rank >= 2 leaf padded with empty slots at the end of `slot_axis`, or
  cut to its first cache_len slots.

  Committed slots keep their indices (lengths are unchanged), so a running batch grows, or shrinks once its longest
  requests are done, without draining. Cutting is only exact for rows whose lengths (plus what they will still
  write) fit in cache_len: the caller's to ensure for the rows it keeps (a finished row is garbage either way).
  """
  def resize(x):
    if x.ndim < 2:
      return x
    if cache_len <= x.shape[slot_axis]:
      return jax.lax.slice_in_dim(x, 0, cache_len, axis=slot_axis)
    widths = [(0, 0)] * x.ndim
    widths[slot_axis] = (0, cache_len - x.shape[slot_axis])
    return jnp.pad(x, widths)

  return jax.tree.map(resize, cache)


def commit(cache: Any, starts_B: jax.Array, path_BR: jax.Array, count_B: jax.Array, num_nodes: int,
           slot_axis: int = 1) -> Any:
  """Moves the accepted tree nodes' K/V from slots starts + path to the contiguous slots starts + 1.. of each row.

  path_BR holds, per row, the block index (1..num_nodes) of the accepted node at each depth; the first count_B[b]
  entries are real. Works on any cache pytree whose rank >= 2 leaves are [B, ...] buffers with their slots on
  `slot_axis` (rank-1 leaves such as `lengths` are left alone). The root already sits at slot starts; lengths are
  the caller's to move.
  """
  depth = path_BR.shape[1]
  keep = jnp.arange(depth)[None, :] < count_B[:, None]
  ax = slot_axis - 1  # inside vmap over rows

  def move_row(buf, start, path, keep_row):
    block = jax.lax.dynamic_slice_in_dim(buf, start, num_nodes + 1, axis=ax)
    shape = [1] * buf.ndim
    shape[ax] = depth
    moved = jnp.where(keep_row.reshape(shape), jnp.take(block, path, axis=ax),
                      jax.lax.slice_in_dim(block, 1, depth + 1, axis=ax))
    return jax.lax.dynamic_update_slice_in_dim(buf, moved, start + 1, axis=ax)

  def move(buf):
    if buf.ndim < 2:
      return buf
    return jax.vmap(move_row)(buf, starts_B, path_BR, keep)

  with jax.named_scope("commit"):
    return jax.tree.map(move, cache)
