"""A second model family for the tests: a small GPT-NeoX-style causal LM, written here from scratch and wrapped in
the target protocol. Everything differs from the bundled Llama: LayerNorm with bias, partial rotary embeddings
(a quarter of each head), a parallel residual (attention and MLP read the same input), a GELU MLP with biases,
an untied output head, and a slot-major KV cache ([B, S, N, H]: slots on axis 1, not 2)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from eagle3_jax.target.protocol import Target


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
  vocab_size: int = 100
  hidden_size: int = 64
  intermediate_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  rotary_pct: float = 0.25
  rope_theta: float = 10000.0
  layer_norm_eps: float = 1e-5
  max_position_embeddings: int = 256
  aux_layers: tuple[int, ...] = (1, 2, 3)
  rms_norm_eps: float = 1e-5  # what a draft for this target uses in its own (Llama-style) layer
  architecture: str = "GPTNeoXForCausalLM"

  @property
  def num_kv_heads(self) -> int:
    return self.num_heads

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def aux_layer_ids(self) -> tuple[int, ...]:
    return self.aux_layers

  def as_target(self) -> Target:
    return neox_target(self)


@flax.struct.dataclass
class NeoXCache:
  k: tuple[jax.Array, ...]  # [B, S, N, H] per layer
  v: tuple[jax.Array, ...]
  lengths: jax.Array  # int32[B]


def init_params(cfg: NeoXConfig, key: jax.Array, std: float = 0.1) -> dict[str, Any]:
  D, F, N, H, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.vocab_size
  keys = iter(jax.random.split(key, 12 * cfg.num_layers + 4))
  normal = lambda *shape: std * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
  layer = lambda: {"ln1_w": 1 + normal(D), "ln1_b": normal(D), "ln2_w": 1 + normal(D), "ln2_b": normal(D),  # noqa: E731
                   "w_qkv": normal(D, 3, N, H), "b_qkv": normal(3, N, H), "w_o": normal(N, H, D), "b_o": normal(D),
                   "w_in": normal(D, F), "b_in": normal(F), "w_out": normal(F, D), "b_out": normal(D)}
  return {"wte": normal(V, D) * 10, "layers": [layer() for _ in range(cfg.num_layers)],
          "ln_f_w": 1 + normal(D), "ln_f_b": normal(D), "unembed": normal(D, V) * 3}


def _layer_norm(x, w, b, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def _partial_rope(x_BTNH, positions_BT, cfg: NeoXConfig):
  R = int(cfg.head_dim * cfg.rotary_pct)
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, R, 2, dtype=jnp.float32) / R))
  ang = positions_BT.astype(jnp.float32)[..., None] * inv
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  rot, rest = x_BTNH[..., :R], x_BTNH[..., R:]
  rotated = jnp.concatenate([-rot[..., R // 2:], rot[..., :R // 2]], axis=-1)
  return jnp.concatenate([rot * jnp.cos(ang) + rotated * jnp.sin(ang), rest], axis=-1)


def _write(buf_BSNH, new_BTNH, starts_B):
  return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(b, n, (s, 0, 0)))(buf_BSNH, new_BTNH, starts_B)


def forward_hidden(params, tokens_BT, positions_BT, cache: NeoXCache | None, mask_BTS, *, cfg: NeoXConfig):
  x = jnp.take(params["wte"], tokens_BT, axis=0)
  taps, new_k, new_v = {}, [], []
  for i, p in enumerate(params["layers"]):
    if i in cfg.aux_layers:
      taps[i] = x
    h = _layer_norm(x, p["ln1_w"], p["ln1_b"], cfg.layer_norm_eps)
    q, k, v = (jnp.einsum("BTD,DNH->BTNH", h, p["w_qkv"][:, j]) + p["b_qkv"][j] for j in range(3))
    q, k = _partial_rope(q, positions_BT, cfg), _partial_rope(k, positions_BT, cfg)
    if cache is not None:
      k, v = _write(cache.k[i], k, cache.lengths), _write(cache.v[i], v, cache.lengths)
      new_k.append(k)
      new_v.append(v)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(cfg.head_dim)
    scores = jnp.where(mask_BTS[:, None], scores, -1e30)
    attn = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(scores, axis=-1), v)
    attn = jnp.einsum("BTNH,NHD->BTD", attn, p["w_o"]) + p["b_o"]
    m = _layer_norm(x, p["ln2_w"], p["ln2_b"], cfg.layer_norm_eps)
    mlp = jax.nn.gelu(m @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]
    x = x + attn + mlp  # parallel residual
  aux = jnp.concatenate([taps[i] for i in cfg.aux_layers], axis=-1)
  if cache is not None:
    cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
  return _layer_norm(x, params["ln_f_w"], params["ln_f_b"], cfg.layer_norm_eps), aux, cache


def lm_head(params, hidden):
  return jnp.einsum("...D,DV->...V", hidden, params["unembed"], preferred_element_type=jnp.float32)


def forward(params, tokens_BT, positions_BT, cache, mask_BTS, *, cfg: NeoXConfig):
  hidden, aux, cache = forward_hidden(params, tokens_BT, positions_BT, cache, mask_BTS, cfg=cfg)
  return lm_head(params, hidden), aux, cache


def init_cache(cfg: NeoXConfig, batch: int, max_len: int, dtype=jnp.float32) -> NeoXCache:
  shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
  return NeoXCache(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))


@functools.cache
def neox_target(cfg: NeoXConfig) -> Target:
  """The protocol wrapper: no head_columns/head_take, so the teacher uses the protocol's generic fallbacks."""
  return Target(forward=functools.partial(forward, cfg=cfg), init_cache=functools.partial(init_cache, cfg),
                embed=lambda params: params["wte"], vocab_size=cfg.vocab_size,
                aux_size=len(cfg.aux_layers) * cfg.hidden_size, max_positions=cfg.max_position_embeddings,
                forward_hidden=functools.partial(forward_hidden, cfg=cfg), lm_head=lm_head, slot_axis=1)
