"""The EAGLE-3 draft head as pure functions: fc fusion of three target layers, one 2D-input decoder layer, Vd head.

The peers' variants are configuration of this one head (DraftConfig flags, as speculators and vLLM name them):
norm_before_fc (one RMSNorm over the concatenated aux states), fc_norm (EAGLE 3.1: one RMSNorm per aux state),
norm_before_residual (the residual branch starts from the normalised hidden), norm_output (EAGLE 3.1: the
post-norm hidden is what the next draft step and tree level receive; lm_head reads it either way) and qk_norm
(a Qwen3-style layer: RMSNorm over each head's q and k before RoPE, speculators' draft_arch "qwen3"), and
sliding_window (the layer sees only the last W positions, speculators' trainer default of 2048: one more mask).
num_layers > 1 stacks plain decoder layers (speculators' layers.1..N-1) on the 2D-input first one; each layer has
its own K/V, and `run_layers` takes the attention as a callback so decoding (a cache) and training (TTT buffers)
share every other op.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.config import DraftConfig
from eagle3_jax.nn import attention, kv_cache, layers, masks
from eagle3_jax.nn.kv_cache import KVCache, write_rows
from eagle3_jax.params import ParamSpec, abstract_of, axes_of, init_from_specs


def param_specs(cfg: DraftConfig) -> dict[str, Any]:
  """Trainable draft parameters, named exactly as the official checkpoint (kernels stored [in, out])."""
  D, Dt, F, N, K, H, Vd = (cfg.hidden_size, cfg.target_hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.draft_vocab_size)
  extra: dict[str, Any] = {}
  qk = {"q_norm": ParamSpec((H,), ("norm",), "ones"), "k_norm": ParamSpec((H,), ("norm",), "ones")} \
      if cfg.qk_norm else {}
  if cfg.norm_before_fc:
    extra["input_norm"] = ParamSpec((cfg.num_aux * Dt,), ("aux",), "ones")
  if cfg.fc_norm:
    extra["fc_norm"] = {str(i): ParamSpec((Dt,), ("norm",), "ones") for i in range(cfg.num_aux)}
  mlp = {"gate_proj": ParamSpec((D, F), ("embed", "mlp")), "up_proj": ParamSpec((D, F), ("embed", "mlp")),
         "down_proj": ParamSpec((F, D), ("mlp", "embed"))}
  if cfg.num_layers > 1:  # plain decoder layers, named as speculators' layers.1..N-1
    plain = {"input_layernorm": ParamSpec((D,), ("norm",), "ones"),
             "self_attn": {"q_proj": ParamSpec((D, N, H), ("embed", "heads", "head_dim")),
                           "k_proj": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim")),
                           "v_proj": ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim")),
                           "o_proj": ParamSpec((N, H, D), ("heads", "head_dim", "embed"))} | qk,
             "post_attention_layernorm": ParamSpec((D,), ("norm",), "ones"), "mlp": mlp}
    extra["layers"] = {str(i): plain for i in range(1, cfg.num_layers)}
  return extra | {
      "fc": ParamSpec((cfg.num_aux * Dt, D), ("aux", "embed")),
      "midlayer": {
          "input_layernorm": ParamSpec((D,), ("norm",), "ones"),
          "hidden_norm": ParamSpec((D,), ("norm",), "ones"),
          "self_attn": {
              "q_proj": ParamSpec((2 * D, N, H), (None, "heads", "head_dim")),
              "k_proj": ParamSpec((2 * D, K, H), (None, "kv_heads", "head_dim")),
              "v_proj": ParamSpec((2 * D, K, H), (None, "kv_heads", "head_dim")),
              "o_proj": ParamSpec((N, H, D), ("heads", "head_dim", "embed")),
          } | qk,
          "post_attention_layernorm": ParamSpec((D,), ("norm",), "ones"),
          "mlp": mlp,
      },
      "norm": ParamSpec((D,), ("norm",), "ones"),
      "lm_head": ParamSpec((D, Vd), ("embed", "draft_vocab")),
  }


def param_axes(cfg: DraftConfig) -> Any:
  return axes_of(param_specs(cfg))


def abstract_params(cfg: DraftConfig, dtype=jnp.float32) -> Any:
  return abstract_of(param_specs(cfg), dtype)


def init_params(cfg: DraftConfig, key: jax.Array, dtype=jnp.float32) -> Any:
  return init_from_specs(param_specs(cfg), key, dtype)


def inv_freq(cfg: DraftConfig) -> np.ndarray:
  return layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


def fuse(params: Any, aux_BTA: jax.Array, *, cfg: DraftConfig) -> jax.Array:
  """fc over the concatenated low/mid/high target states: [B,T,3Dt] -> [B,T,D] (normalised first, per variant)."""
  x = aux_BTA.astype(params["fc"].dtype)
  if cfg.norm_before_fc:
    x = layers.rms_norm(x, params["input_norm"], cfg.rms_norm_eps)
  if cfg.fc_norm:
    chunks = jnp.split(x, cfg.num_aux, axis=-1)
    x = jnp.concatenate([layers.rms_norm(c, params["fc_norm"][str(i)], cfg.rms_norm_eps)
                         for i, c in enumerate(chunks)], axis=-1)
  return jnp.einsum("BTA,AD->BTD", x, params["fc"])


def qkv(params: Any, emb_BTD: jax.Array, hidden_BTD: jax.Array, positions_BT: jax.Array, *,
        cfg: DraftConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q/k/v from [input_layernorm(embedding), hidden_norm(hidden)] (embedding first), RoPE applied."""
  m = params["midlayer"]
  u = jnp.concatenate([layers.rms_norm(emb_BTD.astype(hidden_BTD.dtype), m["input_layernorm"], cfg.rms_norm_eps),
                       layers.rms_norm(hidden_BTD, m["hidden_norm"], cfg.rms_norm_eps)], axis=-1)
  return _project(m["self_attn"], u, positions_BT, cfg)


def _project(a: Any, u_BTE: jax.Array, positions_BT: jax.Array, cfg: DraftConfig):
  q = jnp.einsum("BTE,ENH->BTNH", u_BTE, a["q_proj"])
  k = jnp.einsum("BTE,EKH->BTKH", u_BTE, a["k_proj"])
  v = jnp.einsum("BTE,EKH->BTKH", u_BTE, a["v_proj"])
  if cfg.qk_norm:  # Qwen3: per-head RMSNorm of q and k, before RoPE
    q, k = layers.rms_norm(q, a["q_norm"], cfg.rms_norm_eps), layers.rms_norm(k, a["k_norm"], cfg.rms_norm_eps)
  freqs = inv_freq(cfg)
  return layers.apply_rope(q, positions_BT, freqs), layers.apply_rope(k, positions_BT, freqs), v


def _block_out(lp: Any, residual_BTD: jax.Array, attn_BTNH: jax.Array, cfg: DraftConfig) -> jax.Array:
  """o_proj plus the residual, then the SwiGLU block (every draft layer ends so)."""
  h = residual_BTD + jnp.einsum("BTNH,NHD->BTD", attn_BTNH, lp["self_attn"]["o_proj"])
  mlp = lp["mlp"]
  return h + layers.swiglu(layers.rms_norm(h, lp["post_attention_layernorm"], cfg.rms_norm_eps),
                           mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"])


def run_layers(params: Any, emb_BTD: jax.Array, hidden_BTD: jax.Array, positions_BT: jax.Array,
               attend: Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array], *, cfg: DraftConfig) -> jax.Array:
  """Every draft layer; `attend(i, q, k, v)` is layer i's attention ([B,T,N,H]: over a cache, or TTT's buffers).

  Layer 0's residual is the incoming hidden (EAGLE-3), or hidden_norm of it with norm_before_residual; layers 1..
  are plain pre-norm decoder layers. The result is the draft hidden the next step receives: the pre-norm hidden
  (EAGLE-3), or with norm_output the final norm of it (EAGLE 3.1), which `logits` then reads as is.
  """
  m = params["midlayer"]
  q, k, v = qkv(params, emb_BTD, hidden_BTD, positions_BT, cfg=cfg)
  residual = layers.rms_norm(hidden_BTD, m["hidden_norm"], cfg.rms_norm_eps) if cfg.norm_before_residual \
      else hidden_BTD
  h = _block_out(m, residual, attend(0, q, k, v), cfg)
  for i in range(1, cfg.num_layers):
    lp = params["layers"][str(i)]
    q, k, v = _project(lp["self_attn"], layers.rms_norm(h, lp["input_layernorm"], cfg.rms_norm_eps), positions_BT,
                       cfg)
    h = _block_out(lp, h, attend(i, q, k, v), cfg)
  return layers.rms_norm(h, params["norm"], cfg.rms_norm_eps) if cfg.norm_output else h


def logits(params: Any, out_BTD: jax.Array, *, cfg: DraftConfig) -> jax.Array:
  """Draft-vocab logits [.., Vd] in fp32 of a draft hidden (run_layers'): lm_head always reads it normed."""
  x = out_BTD if cfg.norm_output else layers.rms_norm(out_BTD, params["norm"], cfg.rms_norm_eps)
  return jnp.einsum("...D,DV->...V", x, params["lm_head"], preferred_element_type=jnp.float32)


def init_cache(cfg: DraftConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """The draft's own KV cache (one buffer pair per layer), same conventions as the target's (writes at
  lengths[b] + t)."""
  return kv_cache.init(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)


def forward(params: Any, emb_BTD: jax.Array, hidden_BTD: jax.Array, positions_BT: jax.Array,
            cache: KVCache | None, mask: jax.Array, *, cfg: DraftConfig) -> tuple[jax.Array, KVCache | None]:
  """One masked draft step. hidden is fc(aux) for rows fed by the target, or a previous draft output.

  Returns the draft hidden [B,T,D] (feed back as the next hidden; logits() gives the Vd logits) and the cache with
  the new K/V written at slots cache.lengths[b] + t (lengths unchanged, as for the target).
  """
  with jax.named_scope("draft_step"):
    if cache is None:
      mask = masks.sliding_window(mask, positions_BT, positions_BT, cfg.sliding_window)
      out = run_layers(params, emb_BTD, hidden_BTD, positions_BT, lambda i, q, k, v: attention.attention(
          q, attention.head_major(k), attention.head_major(v), mask), cfg=cfg)
      return out, None
    # A committed slot's index is its position; rows written past lengths (tree nodes, this call's rows) sit
    # within depth + R of the query, inside any window the decoder accepts (speculative.validate).
    mask = masks.sliding_window(mask, positions_BT, jnp.arange(cache.max_len), cfg.sliding_window)
    ks, vs = list(cache.k), list(cache.v)

    def attend(i, q, k, v):
      ks[i], vs[i] = write_rows(ks[i], k, cache.lengths), write_rows(vs[i], v, cache.lengths)
      return attention.attention(q, ks[i], vs[i], mask)

    out = run_layers(params, emb_BTD, hidden_BTD, positions_BT, attend, cfg=cfg)
    return out, cache.replace(k=tuple(ks), v=tuple(vs))
