"""Llama-family target as pure functions: parameter table, static KV cache, forward with EAGLE-3 aux taps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.config import LlamaConfig
from eagle3_jax.nn import attention, kv_cache, layers
from eagle3_jax.nn.kv_cache import KVCache
from eagle3_jax.params import ParamSpec, abstract_of, axes_of, init_from_specs


def param_specs(cfg: LlamaConfig) -> dict[str, Any]:
  """The target's parameter table. Layers are a list (unrolled loop: no per-layer weight copies on CPU)."""
  D, F, N, K, H, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.vocab_size)
  layer = {
      "attn_norm": ParamSpec((D,), ("norm",), "ones"),
      "wq": ParamSpec((D, N, H), ("embed", "heads", "head_dim")),
      "wk": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim")),
      "wv": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim")),
      "wo": ParamSpec((N, H, D), ("heads", "head_dim", "embed")),
      "mlp_norm": ParamSpec((D,), ("norm",), "ones"),
      "w_gate": ParamSpec((D, F), ("embed", "mlp")),
      "w_up": ParamSpec((D, F), ("embed", "mlp")),
      "w_down": ParamSpec((F, D), ("mlp", "embed")),
  }
  if cfg.attention_bias:
    layer |= {"bq": ParamSpec((N, H), ("heads", "head_dim"), "zeros"),
              "bk": ParamSpec((K, H), ("kv_heads", "head_dim"), "zeros"),
              "bv": ParamSpec((K, H), ("kv_heads", "head_dim"), "zeros")}
  if cfg.qk_norm:
    layer |= {"q_norm": ParamSpec((H,), ("norm",), "ones"), "k_norm": ParamSpec((H,), ("norm",), "ones")}
  specs = {
      "embed": ParamSpec((V, D), ("vocab", "embed")),
      "layers": [dict(layer) for _ in range(cfg.num_layers)],
      "final_norm": ParamSpec((D,), ("norm",), "ones"),
  }
  if not cfg.tie_word_embeddings:
    specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
  return specs


def param_axes(cfg: LlamaConfig) -> Any:
  return axes_of(param_specs(cfg))


def abstract_params(cfg: LlamaConfig, dtype=jnp.float32) -> Any:
  return abstract_of(param_specs(cfg), dtype)


def abstract_layer(cfg: LlamaConfig, dtype=jnp.float32) -> Any:
  """Shapes of one decoder layer's weights (what FSDP gathers at a time)."""
  return abstract_of(param_specs(cfg)["layers"][0], dtype)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Any:
  """Random weights (std 0.02, norms at one); jit it with out_shardings to create them already sharded."""
  return init_from_specs(param_specs(cfg), key, dtype)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  return kv_cache.init(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)


def cache_axes(cfg: LlamaConfig) -> KVCache:
  return kv_cache.axes(cfg.num_layers)


def _attention_block(cfg: LlamaConfig, p: dict, x_BTD: jax.Array, positions_BT: jax.Array,
                     kv: tuple[jax.Array, jax.Array] | None, starts_B: jax.Array | None,
                     mask: jax.Array, inv_freq: np.ndarray):
  q = jnp.einsum("BTD,DNH->BTNH", x_BTD, p["wq"])
  k = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["wk"])
  v = jnp.einsum("BTD,DKH->BTKH", x_BTD, p["wv"])
  if cfg.attention_bias:
    q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
  if cfg.qk_norm:
    q = layers.rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = layers.rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  q = layers.apply_rope(q, positions_BT, inv_freq)
  k = layers.apply_rope(k, positions_BT, inv_freq)
  if kv is not None:
    k_cache, v_cache = kv_cache.write_rows(kv[0], k, starts_B), kv_cache.write_rows(kv[1], v, starts_B)
    out = attention.attention(q, k_cache, v_cache, mask)
    kv = (k_cache, v_cache)
  else:
    out = attention.attention(q, attention.head_major(k), attention.head_major(v), mask)
  # Flattened to [B,T,N*H] @ [N*H,D] (a free reshape of row-major wo): contracting over (N, H) as two axes made
  # XLA:CPU transpose all of wo in every call (30 x 1.3 MB copies per SmolLM2 step, 6.6 of ~42 ms).
  B, T, N, H = out.shape
  return out.reshape(B, T, N * H) @ p["wo"].reshape(N * H, -1), kv


def forward_hidden(params: Any, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None,
                   mask: jax.Array, *, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array, KVCache | None]:
  """Runs the decoder stack. Returns (final-normed hidden [B,T,D], aux [B,T,len(aux)*D], cache).

  mask is [B,T,S] boolean: S = cache.max_len with a cache (new K/V go to slots cache.lengths[b] + t),
  or S = T without one. Aux = residual stream entering each of cfg.aux_layer_ids, concatenated in that order (id
  num_layers: the residual leaving the last layer, before the final norm).
  """
  inv_freq = layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
  x = jnp.take(params["embed"], tokens_BT, axis=0)
  aux_ids = cfg.aux_layer_ids
  taps: dict[int, jax.Array] = {}
  new_k, new_v = [], []
  for i, p in enumerate(params["layers"]):
    if i in aux_ids:
      taps[i] = x
    with jax.named_scope(f"layer_{i}"):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      starts = None if cache is None else cache.lengths
      h, kv = _attention_block(cfg, p, layers.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps),
                               positions_BT, kv, starts, mask, inv_freq)
      x = x + h
      x = x + layers.swiglu(layers.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps),
                            p["w_gate"], p["w_up"], p["w_down"])
    if kv is not None:
      new_k.append(kv[0])
      new_v.append(kv[1])
  # Tap L (speculators accepts it, "the final hidden state") is the residual after the last layer, before the final
  # norm: the state speculators' trainer passes through the verifier's norm and head.
  taps[len(params["layers"])] = x
  aux = jnp.concatenate([taps[i] for i in aux_ids], axis=-1)
  if cache is not None:
    cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
  return layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), aux, cache


def embed_table(params: Any) -> jax.Array:
  """The input embedding table [V, D]."""
  return params["embed"]


def lm_head(params: Any, hidden: jax.Array, *, cfg: LlamaConfig) -> jax.Array:
  """Logits in fp32 from final-normed hidden states: from params["lm_head_chunks"] or params["lm_head"] [D, V] when
  present (a head in its decode layout, or untied), else from the tied embedding [V, D]."""
  if "lm_head_chunks" in params:
    return _chunked_head(hidden, params["lm_head_chunks"], cfg.vocab_size)
  # Tied: contract against [V,D] directly; an explicit .T may be materialised (a 113 MB copy per step for SmolLM2).
  if "lm_head" not in params:
    return jnp.einsum("...D,VD->...V", hidden, params["embed"], preferred_element_type=jnp.float32)
  return jnp.einsum("...D,DV->...V", hidden, params["lm_head"], preferred_element_type=jnp.float32)


# The head as [C, D, HEAD_CHUNK] column blocks, one product per block in a loop, for CHUNKED_ROWS rows a step.
# XLA:CPU's own kernel (decode/xla_cpu.py) multiplies 2-16 rows by SmolLM2's whole [576, 49152] head at 2.5-6x its
# read cost; alone, 768-column blocks (1.8 MB each) cost 11-24 ms against 17-43 ms. Inside a whole target pass the
# gain shows only from about 8 rows (9 rows: 101 against 113 ms, 16: 160 against 167; 2-5 rows: equal) and one row
# or 32 rows are slower in blocks (BENCHMARKS.md "The head in column blocks"), so only 8-16 rows use them.
HEAD_CHUNK = 768
CHUNKED_ROWS = range(8, 17)


def _chunked_head(hidden: jax.Array, w_CDK: jax.Array, V: int) -> jax.Array:
  lead, D = hidden.shape[:-1], hidden.shape[-1]
  h_ND = hidden.reshape(-1, D)
  y_CNK = jax.lax.map(lambda w_DK: jnp.dot(h_ND, w_DK, preferred_element_type=jnp.float32), w_CDK)
  return jnp.moveaxis(y_CNK, 0, 1).reshape(*lead, -1)[..., :V]


def decode_layout(params: Any, *, cfg: LlamaConfig, rows: int = 1) -> Any:
  """params with the head laid out for decode executables on XLA:CPU that multiply `rows` rows a step, whose
  few-row products stream weights only over their major axis (decode/xla_cpu.py): a [D, V] copy of a tied head
  (113 MB for SmolLM2 in fp32), or for CHUNKED_ROWS rows the head in [C, D, HEAD_CHUNK] column blocks (the last
  zero-padded, then cut off the logits). Made once per executable call, before its loop, or once by a caller that
  keeps the laid-out params (the slot batchers); params already laid out come back as they are. The barrier keeps
  XLA from folding the copy back into the head's product."""
  if rows in CHUNKED_ROWS:
    if "lm_head_chunks" in params:
      return params
    w_DV = params["lm_head"] if "lm_head" in params else params["embed"].T
    D, V = w_DV.shape
    C = -(-V // HEAD_CHUNK)
    w_DV = jnp.pad(w_DV, ((0, 0), (0, C * HEAD_CHUNK - V)))
    chunks = jnp.moveaxis(w_DV.reshape(D, C, HEAD_CHUNK), 1, 0)
    return {**params, "lm_head_chunks": jax.lax.optimization_barrier(chunks)}
  if "lm_head" in params:
    return params
  return {**params, "lm_head": jax.lax.optimization_barrier(params["embed"].T)}


def head_columns(params: Any, hidden: jax.Array, start: Any, size: int, *, cfg: LlamaConfig) -> jax.Array:
  """fp32 logits [..., size] for vocabulary columns start..start+size-1 (start may be traced; no transpose)."""
  if cfg.tie_word_embeddings:
    w_CD = jax.lax.dynamic_slice_in_dim(params["embed"], start, size, axis=0)
    return jnp.einsum("...D,CD->...C", hidden, w_CD, preferred_element_type=jnp.float32)
  w_DC = jax.lax.dynamic_slice_in_dim(params["lm_head"], start, size, axis=1)
  return jnp.einsum("...D,DC->...C", hidden, w_DC, preferred_element_type=jnp.float32)


def head_take(params: Any, hidden: jax.Array, ids_C: jax.Array, *, cfg: LlamaConfig) -> jax.Array:
  """fp32 logits [..., C] for the vocabulary ids ids_C only (e.g. a draft vocabulary): [..., V] never exists."""
  if cfg.tie_word_embeddings:
    return jnp.einsum("...D,CD->...C", hidden, jnp.take(params["embed"], ids_C, axis=0),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("...D,DC->...C", hidden, jnp.take(params["lm_head"], ids_C, axis=1),
                    preferred_element_type=jnp.float32)


def forward(params: Any, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None,
            mask: jax.Array, *, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array, KVCache | None]:
  """The target protocol: (logits [B,T,V] fp32, aux [B,T,3D], cache)."""
  hidden, aux, cache = forward_hidden(params, tokens_BT, positions_BT, cache, mask, cfg=cfg)
  return lm_head(params, hidden, cfg=cfg), aux, cache
