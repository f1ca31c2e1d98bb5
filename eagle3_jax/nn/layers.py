"""Building blocks shared by target and draft: RMSNorm, RoPE (with llama3 scaling), masked attention, SwiGLU, masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.config import RopeScaling

# Finite rather than -inf: a fully masked row (padding) must give zeros-ish, never NaN.
_MASKED = -1e30


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """RMSNorm with fp32 statistics, cast back before the weight (as transformers' LlamaRMSNorm)."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """Inverse frequencies [H/2] in float32; llama3 scaling stretches low frequencies by `factor`."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if scaling is not None:
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotate-half (NeoX) RoPE; angles in fp32, as transformers computes them."""
  angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,H/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x_BTNH.dtype), jnp.sin(angles).astype(x_BTNH.dtype)
  half = x_BTNH.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
  return x_BTNH * cos + rotated * sin


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """Grouped-query attention under an arbitrary boolean mask (causal, tree, TTT are all just masks)."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  with jax.named_scope("attention"):
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH).astype(jnp.float32) / math.sqrt(H)
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BSKH)
  return out.reshape(B, T, N, H)


def cache_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
  """`attention` over a head-major cache. The G query heads sharing a KV head and the T queries form one Q = G*T
  axis, so each layer is K plain [Q,H] x [H,S] products over the cache as stored: no transposed copy of the cache
  and no tiny (G, T) batch dims, which XLA:CPU runs 4x slower at T = 1 (measured, S = 2048)."""
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  G = N // K
  q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  with jax.named_scope("attention"):
    scores = jnp.einsum("BKQH,BKSH->BKQS", q_BKQH, k_BKSH).astype(jnp.float32) / math.sqrt(H)
    mask_BQS = jnp.tile(mask_BTS, (1, G, 1))  # query index q = g*T + t
    scores = jnp.where(mask_BQS[:, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v_BKSH)
  return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def swiglu(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array) -> jax.Array:
  with jax.named_scope("mlp"):
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down_FD)


# ----- masks as data -------------------------------------------------------------------------------------------


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


def tree_cache_mask(starts_B: jax.Array, tree_mask_BPP: jax.Array, S: int) -> jax.Array:
  """[B,P,S] for P tree nodes written at slots starts..starts+P-1: whole prefix + own ancestors (tree_mask)."""
  B, P, _ = tree_mask_BPP.shape
  s = jnp.arange(S)
  prefix = s[None, None, :] < starts_B[:, None, None]
  rel = s[None, :] - starts_B[:, None]  # [B,S] position of slot inside the tree block
  in_block = (rel >= 0) & (rel < P)
  rel_c = jnp.clip(rel, 0, P - 1)
  tree = jnp.take_along_axis(tree_mask_BPP, jnp.broadcast_to(rel_c[:, None, :], (B, P, S)), axis=2)
  return prefix | (tree & in_block[:, None, :])
