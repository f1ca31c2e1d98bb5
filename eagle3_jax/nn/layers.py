"""Building blocks shared by target and draft: RMSNorm, RoPE (with llama3 scaling), SwiGLU."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.config import RopeScaling


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


def swiglu(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array) -> jax.Array:
  with jax.named_scope("mlp"):
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down_FD)
