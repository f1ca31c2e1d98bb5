"""The TTT loss written the obvious way (a Python loop, dense attention), the reference the scan must equal."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.head import DraftConfig
from eagle3_jax.nn import attention, masks
from eagle3_jax.train.ttt import _check_norm, _finish, _shift_pad, _step_terms


def ttt_loss_reference(draft_params: Any, embed_VD: jax.Array, aux_BTA: jax.Array, tokens_BT: jax.Array,
                       loss_mask_BT: jax.Array, probs_BTVd: jax.Array, in_vocab_BT: jax.Array, *, cfg: DraftConfig,
                       steps: int = 7, decay: float = 0.8, remat: bool = False, loss_norm: str = "batch"
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ttt.ttt_loss written the obvious way: a Python loop, explicit shifts, and dense attention over the
  concatenated keys of all steps so far under the extended mask (causal ⊕ identity per extra step)."""
  del remat
  _check_norm(loss_norm)
  B, T = tokens_BT.shape
  hidden = draft.fuse(draft_params, aux_BTA, cfg=cfg)
  pos_w = _shift_pad(loss_mask_BT.astype(jnp.float32), 1, T) * in_vocab_BT
  target_BT = jnp.argmax(probs_BTVd, axis=-1)
  ks, vs, terms = [[] for _ in range(cfg.num_layers)], [[] for _ in range(cfg.num_layers)], []
  for j in range(steps):
    emb = embed_VD[_shift_pad(tokens_BT, j + 1, T)]
    mask = jnp.broadcast_to(masks.ttt_extended_mask(T, j, cfg.sliding_window), (B, T, (j + 1) * T))

    def attend(i, q, k, v):  # layer i: dense attention over its keys of steps 0..j
      ks[i].append(k)
      vs[i].append(v)
      return attention.attention(q, attention.head_major(jnp.concatenate(ks[i], 1)),
                                 attention.head_major(jnp.concatenate(vs[i], 1)), mask)

    hidden = draft.run_layers(draft_params, emb, hidden, jnp.broadcast_to(jnp.arange(T) + j, (B, T)), attend,
                              cfg=cfg)
    lm = _shift_pad(loss_mask_BT.astype(jnp.float32), j + 2, T)
    terms.append(_step_terms(draft.logits(draft_params, hidden, cfg=cfg), _shift_pad(probs_BTVd, j + 1, T),
                             _shift_pad(target_BT, j + 1, T), _shift_pad(pos_w, j + 1, T)) + (jnp.sum(lm),))
  ce_sum, correct, weight_sum, mask_sum = (jnp.stack(x) for x in zip(*terms))
  return _finish(ce_sum, correct, weight_sum, mask_sum, B=B, T=T, decay=decay, loss_norm=loss_norm)
