"""The target protocol: the only road from decoding and training to a target model (any JAX LLM can be one).

  forward(params, tokens_BT, positions_BT, cache, mask_BTS) -> (logits_BTV float32, aux_BTA, cache)
    K/V of the T new tokens are written at slots cache.lengths[b] + t and forward never moves `lengths` (the caller
    commits). mask_BTS is boolean over every cache slot: prefill, decode and tree verify are just different masks.
    aux_BTA is the concatenation of the hidden states the draft was trained on (EAGLE-3: inputs of 3 layers).
  init_cache(batch, max_len, dtype) -> cache: a pytree with `lengths` int32[B] and `.replace(lengths=...)`; every
    rank >= 2 leaf is a [B, ...] buffer with its S slots on axis `slot_axis` (accepted tree slots move along it).
  embed(params) -> [V, D]: the input embedding table; EAGLE-3 drafts embed their input tokens with it.
  forward_hidden(params, ...) -> (hidden, aux, cache) and lm_head(params, hidden) -> logits are optional: with them
    a prefill computes logits only at each row's last prompt token instead of all [B, T, V], and training reads
    the target's final hidden states. head_columns(params, hidden, start, size) and head_take(params, hidden, ids)
    (logits of a column range / of chosen ids) are optional too: they let the teacher skip the full [.., V] logits.
  decode_layout(params) -> params is optional: the same weights in the layout decode executables read best (the
    Llama target adds a [D, V] copy of a tied head); decoding calls it once per executable call, before its loop,
    where decode/xla_cpu.py says so (XLA:CPU). It must return params already in that layout unchanged: the slot
    batchers lay out once and their loops call it again.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from eagle3_jax.config import LlamaConfig
from eagle3_jax.nn import kv_cache, masks
from eagle3_jax.target import llama


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
  """A target model behind the protocol in the module docstring. Hashed by identity: build each one once."""

  forward: Callable[..., tuple[jax.Array, jax.Array, Any]]
  init_cache: Callable[[int, int, Any], Any]
  embed: Callable[[Any], jax.Array]
  vocab_size: int
  aux_size: int  # A, width of aux (num_aux * hidden)
  max_positions: int
  forward_hidden: Callable | None = None
  lm_head: Callable | None = None
  head_columns: Callable | None = None
  head_take: Callable | None = None
  decode_layout: Callable | None = None
  cache_axes: Any = None  # logical axes of the cache pytree; None lets XLA choose under a mesh
  slot_axis: int = 1  # axis of the S cache slots in every rank >= 2 cache leaf

  def cache_slots(self, cache: Any) -> int:
    """S, the number of slots of a cache of this target."""
    return kv_cache.slots(cache, self.slot_axis)

  def logits_columns(self, params: Any, hidden: jax.Array, start: Any, size: int) -> jax.Array:
    """fp32 logits of vocabulary columns start..start+size-1 from final hidden states."""
    if self.head_columns is not None:
      return self.head_columns(params, hidden, start, size)
    return jax.lax.dynamic_slice_in_dim(self._lm_head(params, hidden), start, size, axis=-1)

  def logits_take(self, params: Any, hidden: jax.Array, ids: jax.Array) -> jax.Array:
    """fp32 logits of the vocabulary ids `ids` only, from final hidden states."""
    if self.head_take is not None:
      return self.head_take(params, hidden, ids)
    return jnp.take(self._lm_head(params, hidden), ids, axis=-1)

  def _lm_head(self, params: Any, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      raise ValueError("this Target has no lm_head: training and the teacher need forward_hidden and lm_head")
    return self.lm_head(params, hidden).astype(jnp.float32)

  def hidden_states(self, params: Any, tokens_BT: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(aux_BTA, final hidden_BTD) of right-padded rows, without a cache (training features)."""
    if self.forward_hidden is None:
      raise ValueError("this Target has no forward_hidden: training needs the target's final hidden states")
    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    hidden, aux, _ = self.forward_hidden(params, tokens_BT, positions, None, masks.causal_mask(lengths_B, T))
    return aux, hidden

  def last_logits(self, params: Any, tokens_BT: jax.Array, positions_BT: jax.Array, cache: Any, mask: jax.Array,
                  last_B: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """(logits [B,V] at position last_B[b] of each row, aux [B,T,A], cache): a prefill's forward pass."""
    take_last = lambda x: jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
    if self.forward_hidden is not None and self.lm_head is not None:
      hidden, aux, cache = self.forward_hidden(params, tokens_BT, positions_BT, cache, mask)
      return self.lm_head(params, take_last(hidden)), aux, cache
    logits, aux, cache = self.forward(params, tokens_BT, positions_BT, cache, mask)
    return take_last(logits), aux, cache


def as_target(target_or_cfg: Any) -> Target:
  """A Target as given; the bundled Llama-family target of a LlamaConfig; or `cfg.as_target()` for a config of
  another model family (training identifies its target by such a config: hashable, with the fields a draft reads:
  vocab_size, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, rms_norm_eps, num_layers,
  aux_layer_ids, max_position_embeddings)."""
  if isinstance(target_or_cfg, Target):
    return target_or_cfg
  if isinstance(target_or_cfg, LlamaConfig):
    return llama_target(target_or_cfg)
  if hasattr(target_or_cfg, "as_target"):
    return target_or_cfg.as_target()
  raise TypeError(f"not a target: {type(target_or_cfg).__name__} (expected a Target, a LlamaConfig or a config "
                  "with an as_target() method)")


@functools.cache
def llama_target(cfg: LlamaConfig) -> Target:
  """The bundled Llama-family target (cached, so equal configs share one Target and one compilation)."""
  return Target(forward=functools.partial(llama.forward, cfg=cfg),
                init_cache=functools.partial(llama.init_cache, cfg),
                embed=llama.embed_table, vocab_size=cfg.vocab_size,
                aux_size=len(cfg.aux_layer_ids) * cfg.hidden_size, max_positions=cfg.max_position_embeddings,
                forward_hidden=functools.partial(llama.forward_hidden, cfg=cfg),
                lm_head=functools.partial(llama.lm_head, cfg=cfg),
                head_columns=functools.partial(llama.head_columns, cfg=cfg),
                head_take=functools.partial(llama.head_take, cfg=cfg),
                decode_layout=functools.partial(llama.decode_layout, cfg=cfg), cache_axes=llama.cache_axes(cfg),
                slot_axis=kv_cache.SLOT_AXIS)
