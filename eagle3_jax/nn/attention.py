"""The one masked attention core (head-major K/V), and the TTT attention as its structured variant."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from eagle3_jax.nn import masks

# Finite rather than -inf: a fully masked row (padding) must give zeros-ish, never NaN. Both functions below use it,
# so they agree bit for bit on masked entries.
MASKED = -1e30
# Query rows per KV head (G*T) up to which scores are laid out keys-first: every decode step, tree verify (17 tokens
# x 3 heads = 51) and draft pass; prefill chunks have more.
FEW_QUERIES = 64


def attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """Grouped-query attention under an arbitrary boolean mask: causal prefill, decode, tree verify, draft expansion
  and the draft's context pass are all just masks.

  K/V are head-major ([B,K,S,H], the KV cache's layout). The G query heads sharing a KV head and the T queries
  form one Q = G*T axis, so each layer is K plain [Q,H] x [H,S] products over the keys as stored: no transposed
  copy of the cache and no tiny (G, T) batch dims, which XLA:CPU runs 4x slower at T = 1 (measured, S = 2048).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  G = N // K
  q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  mask_BQS = jnp.tile(mask_BTS, (1, G, 1))  # query index q = g*T + t
  with jax.named_scope("attention"):
    if G * T <= FEW_QUERIES:
      # Decode, verify and draft passes: scores as [S, Q] (keys as the long side of each product). On 2 CPU cores,
      # 30 SmolLM2 layers (BENCHMARKS.md "Attention for few queries"): B 16, S 512 63 ms against 87 the other way
      # round, B 32, S 1024 191 against 341, B 1 within noise; prefill (Q in the hundreds) is faster as below.
      scores = jnp.einsum("BKSH,BKQH->BKSQ", k_BKSH, q_BKQH).astype(jnp.float32) / math.sqrt(H)
      scores = jnp.where(jnp.swapaxes(mask_BQS, 1, 2)[:, None], scores, MASKED)
      probs = jax.nn.softmax(scores, axis=-2).astype(v_BKSH.dtype)
      out = jnp.einsum("BKSQ,BKSH->BKQH", probs, v_BKSH)
    else:
      scores = jnp.einsum("BKQH,BKSH->BKQS", q_BKQH, k_BKSH).astype(jnp.float32) / math.sqrt(H)
      scores = jnp.where(mask_BQS[:, None], scores, MASKED)
      probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
      out = jnp.einsum("BKQS,BKSH->BKQH", probs, v_BKSH)
  return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def head_major(x_BTKH: jax.Array) -> jax.Array:
  """[B,T,K,H] projections -> [B,K,T,H], the layout `attention` reads (for calls without a cache)."""
  return jnp.swapaxes(x_BTKH, 1, 2)


def ttt_attention(q_BTNH: jax.Array, k_RBTKH: jax.Array, v_RBTKH: jax.Array, step: Any,
                  window: int | None = None) -> jax.Array:
  """Attention of TTT step `step` (corrected mask): row t sees step-0 keys s <= t (and t - s < window for a
  sliding-window layer, rows counted as speculators' trainer counts them) and its own chain of keys from steps
  1..step at row t (the diagonal). Buffer slot 0 holds the step-0 K/V over all T positions, slot i the keys step i
  wrote; slots beyond `step` are ignored whatever they hold.

  Equals `attention` over the keys [K_0; K_1; ...; K_step] with masks.ttt_extended_mask (causal ⊕ identity per
  extra step), at O(T·R) instead of O(T²·R) extra cost.
  """
  B, T, N, H = q_BTNH.shape
  R, K = k_RBTKH.shape[0], k_RBTKH.shape[3]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  with jax.named_scope("ttt_attention"):
    scale = 1.0 / math.sqrt(H)
    causal_TS = masks.ttt_extended_mask(T, 0, window)
    s0 = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_RBTKH[0]).astype(jnp.float32) * scale
    s0 = jnp.where(causal_TS, s0, MASKED)
    sd = jnp.einsum("BTKGH,RBTKH->BKGTR", q_BTKGH, k_RBTKH).astype(jnp.float32) * scale
    slot = jnp.arange(R)
    sd = jnp.where((slot >= 1) & (slot <= step), sd, MASKED)
    probs = jax.nn.softmax(jnp.concatenate([s0, sd], axis=-1), axis=-1).astype(v_RBTKH.dtype)
    out = (jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :T], v_RBTKH[0])
           + jnp.einsum("BKGTR,RBTKH->BTKGH", probs[..., T:], v_RBTKH))
  return out.reshape(B, T, N, H)
