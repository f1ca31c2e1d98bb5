"""Every attention mask, as data: causal prefill, cache-causal decode, tree blocks and ancestors, sliding windows,
TTT extended."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(lengths_B: jax.Array, T: int) -> jax.Array:
  """[B,T,T]: query t sees keys s <= t, both inside the row's valid length (right padding)."""
  t = jnp.arange(T)
  valid = t[None, :] < lengths_B[:, None]
  return (t[:, None] >= t[None, :])[None] & valid[:, None, :] & valid[:, :, None]


def cache_causal_mask(starts_B: jax.Array, T: int, S: int) -> jax.Array:
  """[B,T,S] for T new tokens written at slots starts..starts+T-1 of a cache of S slots.

  Query t of row b sees every slot s <= starts[b] + t: the committed prefix plus the new tokens up to itself.
  """
  s = jnp.arange(S)
  last = starts_B[:, None] + jnp.arange(T)[None, :]  # [B,T]
  return s[None, None, :] <= last[:, :, None]


def block_mask(starts_B: jax.Array, rows_BTQ: jax.Array, S: int) -> jax.Array:
  """[B,T,S]: every slot below starts[b], plus block slot starts[b] + q where rows[b, t, q].

  With rows = a tree's ancestor mask [B,P,P] this is the verify mask of P tree nodes written at slots
  starts..starts+P-1 (whole prefix + own ancestors); the draft's tree expansion uses it for its temporary block.
  """
  B, T, Q = rows_BTQ.shape
  s = jnp.arange(S)
  rel = s[None, :] - starts_B[:, None]  # [B,S] position of slot inside the block
  in_block = (rel >= 0) & (rel < Q)
  rows = jnp.take_along_axis(rows_BTQ, jnp.broadcast_to(jnp.clip(rel, 0, Q - 1)[:, None, :], (B, T, S)), axis=2)
  return (rel < 0)[:, None, :] | (rows & in_block[:, None, :])


def ancestor_mask(parents_BP: jax.Array, depth: int) -> jax.Array:
  """[B,P+1,P+1] ancestor-or-self mask of a tree given each node's parent in the (P+1)-block."""
  B, P = parents_BP.shape
  par = jnp.concatenate([jnp.zeros((B, 1), parents_BP.dtype), parents_BP], axis=1)  # root is its own parent
  eye = jnp.eye(P + 1, dtype=jnp.bool_)[None]
  anc = jnp.broadcast_to(eye, (B, P + 1, P + 1))
  # After d rounds every node holds its ancestors up to d levels up; depth rounds reach the root.
  for _ in range(depth):
    anc = eye | jnp.take_along_axis(anc, par[:, :, None], axis=1)
  return anc


def sliding_window(mask_BTS: jax.Array, q_positions_BT: jax.Array, k_positions: jax.Array,
                   window: int | None) -> jax.Array:
  """mask_BTS and, for a sliding-window layer, key position > query position - window (a query sees `window`
  positions, itself included, as transformers and speculators count). k_positions: [S] or [B,S]."""
  if window is None:
    return mask_BTS
  k_BS = jnp.broadcast_to(k_positions, (mask_BTS.shape[0], mask_BTS.shape[2]))
  return mask_BTS & (k_BS[:, None, :] > q_positions_BT[:, :, None] - window)


def ttt_extended_mask(T: int, step: int, window: int | None = None) -> jax.Array:
  """[T, (step+1)·T] dense TTT mask: causal over the step-0 keys (within `window` rows of the query, for a
  sliding-window layer), then an identity block per extra step."""
  eye = jnp.eye(T, dtype=bool)
  t = jnp.arange(T)
  causal = t[:, None] >= t[None, :]
  if window is not None:
    causal &= t[:, None] - t[None, :] < window
  return jnp.concatenate([causal] + [eye] * step, axis=1)
