"""The EAGLE-3 training-time test: teacher distribution, and the R-step draft loss as one `jax.lax.scan`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.head import DraftConfig
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.nn import attention
from eagle3_jax.target.protocol import Target

LOSS_NORMS = ("batch", "tokens")


# ----- teacher -------------------------------------------------------------------------------------------------


def full_argmax(target: Target, target_params: Any, hidden_BTD: jax.Array, *, vocab_chunk: int = 16384
                ) -> jax.Array:
  """argmax over the full target vocabulary, first index on ties (as jnp.argmax), in chunks of vocab_chunk columns.

  Peak extra memory is B·T·vocab_chunk fp32 instead of B·T·V: for Llama-3 (V=128256) at B·T=4096 that is
  268 MB per 16384-column chunk against 2.1 GB for the whole row.
  """
  V = target.vocab_size
  if vocab_chunk >= V:
    return jnp.argmax(target.logits_columns(target_params, hidden_BTD, 0, V), axis=-1)
  B, T, _ = hidden_BTD.shape

  def body(c, best):
    best_val, best_idx = best
    # The last chunk's start is clamped to V - chunk (dynamic_slice semantics); re-seen columns never win because
    # only a strictly larger value replaces the running best, which also keeps the first index on ties.
    start = jnp.minimum(c * vocab_chunk, V - vocab_chunk)
    chunk = target.logits_columns(target_params, hidden_BTD, start, vocab_chunk)
    val, idx = jnp.max(chunk, axis=-1), jnp.argmax(chunk, axis=-1).astype(jnp.int32) + start
    better = val > best_val
    return jnp.where(better, val, best_val), jnp.where(better, idx, best_idx)

  init = (jnp.full((B, T), -jnp.inf, jnp.float32), jnp.zeros((B, T), jnp.int32))
  return jax.lax.fori_loop(0, -(-V // vocab_chunk), body, init)[1]


def teacher(target: Target, target_params: Any, hidden_BTD: jax.Array, vocab: DraftVocab, *,
            vocab_chunk: int = 16384, argmax_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Soft labels for the draft, from the target's final-normed hidden states (no gradient flows back).

  Returns (probs_BTVd fp32: the target softmax restricted to the draft-vocab columns and renormalised over them,
  in_vocab_BT bool: the target's full-vocab argmax is a draft-vocab token). Row t is the target's prediction of
  token t+1. Only the Vd columns are materialised (hidden @ head[:, draft ids]); the full-vocab argmax is taken
  in chunks of `vocab_chunk` columns, so the [B,T,V] fp32 logits never exist at once.
  """
  hidden_BTD = jax.lax.stop_gradient(hidden_BTD)
  ids_Vd = vocab.target_ids()
  with jax.named_scope("teacher"):
    logits_BTVd = target.logits_take(target_params, hidden_BTD, ids_Vd)
    probs = jax.nn.softmax(logits_BTVd, axis=-1)
    if argmax_BT is None:  # offline stores carry it: the full [D, V] head then never runs in the step
      argmax_BT = full_argmax(target, target_params, hidden_BTD, vocab_chunk=vocab_chunk)
    in_vocab = vocab.t2d[argmax_BT]
  return jax.lax.stop_gradient(probs), in_vocab


# ----- loss ----------------------------------------------------------------------------------------------------


def _shift_pad(x: jax.Array, shift: int, total: int) -> jax.Array:
  """x[:, shift:] right-padded with zeros to length `total` along axis 1."""
  x = x[:, shift:]
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, total - x.shape[1])
  return jnp.pad(x, pad)


def _step_terms(logits_BTVd, p_BTVd, target_BT, w_BT):
  """(masked CE sum, correct count, weight sum) of one step; w is the position mask as float."""
  logq = jax.nn.log_softmax(logits_BTVd, axis=-1)
  ce_BT = -jnp.sum(p_BTVd * logq, axis=-1)
  correct = jnp.sum((jnp.argmax(logits_BTVd, axis=-1) == target_BT) * w_BT)
  return jnp.sum(ce_BT * w_BT), correct, jnp.sum(w_BT)


def _check_norm(loss_norm: str) -> None:
  if loss_norm not in LOSS_NORMS:
    raise ValueError(f"loss_norm={loss_norm!r}; expected one of {LOSS_NORMS}")


def _finish(ce_sum, correct, weight_sum, mask_sum, *, B, T, decay, loss_norm):
  denom = jnp.float32(B * T) if loss_norm == "batch" else jnp.maximum(weight_sum, 1.0)
  loss_R = ce_sum / denom
  weights_R = decay ** jnp.arange(loss_R.shape[0], dtype=jnp.float32)
  metrics = {"loss": loss_R, "acc": correct / jnp.maximum(weight_sum, 1.0), "correct": correct,
             "weight_sum": weight_sum, "ce_sum": ce_sum, "mask_sum": mask_sum}
  return jnp.sum(weights_R * loss_R), metrics


def _aligned_targets(probs_BTVd, in_vocab_BT, loss_mask_BT, tokens_BT, steps):
  """Teacher-row-aligned arrays, right-padded by `steps` + 1 rows so that step j reads rows j+1..j+T.

  Teacher row u predicts token u+1, so its weight is loss_mask[u+1] · in_vocab[u]: a position counts iff the
  token being predicted is an assistant token (the official code uses loss_mask[t+j], two tokens earlier).
  """
  T = tokens_BT.shape[1]
  total = T + steps + 1
  lm_next = _shift_pad(loss_mask_BT.astype(jnp.float32), 1, T)  # [B,T]: loss_mask[u+1]
  pos_w = lm_next * in_vocab_BT.astype(jnp.float32)
  return (_shift_pad(probs_BTVd, 0, total), _shift_pad(jnp.argmax(probs_BTVd, -1).astype(jnp.int32), 0, total),
          _shift_pad(pos_w, 0, total), _shift_pad(lm_next, 0, total), _shift_pad(tokens_BT, 0, total))


def ttt_loss(draft_params: Any, embed_VD: jax.Array, aux_BTA: jax.Array, tokens_BT: jax.Array,
             loss_mask_BT: jax.Array, probs_BTVd: jax.Array, in_vocab_BT: jax.Array, *, cfg: DraftConfig,
             steps: int = 7, decay: float = 0.8, remat: bool = False, loss_norm: str = "batch"
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Training-time-test loss over R = `steps` draft steps, as one lax.scan with a fixed-shape carry.

  Step j, row t: hidden = fc(aux[t]) at j=0 else the (non-detached) draft output of step j-1 at row t; input
  token x[t+j+1] (0 beyond the end); RoPE position t+j; attention per `ttt_attention`; target = teacher row
  t+j+1 (predicts x[t+j+2]); counted iff loss_mask[t+j+2] and in_vocab[t+j+1]. Right padding is assumed: with
  loss_mask 0 on padding no counted position can see a padding key, so no padding mask is needed.

  loss_j = Σ_t w·(−Σ_v p·log q) / denom. loss_norm="batch" (default, the official recipe) divides by B·T: a
  constant, so every assistant token weighs the same whichever batch, microbatch or data shard it falls in, and
  the official lr / clip-0.5 tuning carries over. loss_norm="tokens" divides each step by its own counted
  positions (issue #340): loss values read as per-token cross-entropy, but tokens in sparse batches weigh more.
  Returns Σ_j decay^j loss_j and metrics of shape [R]: loss, acc (argmax match over counted positions),
  correct, weight_sum (counted positions), ce_sum, mask_sum (assistant positions incl. out-of-vocab targets;
  correct/mask_sum is the official acc). remat=True recomputes each step in the backward pass (jax.checkpoint).
  Memory: the backward pass keeps per step the [R,B,T,K,H] K/V buffers and the [B,T,Vd] fp32 logits/targets.
  """
  _check_norm(loss_norm)
  B, T = tokens_BT.shape
  p_pad, tgt_pad, w_pad, lm_pad, tok_pad = _aligned_targets(probs_BTVd, in_vocab_BT, loss_mask_BT, tokens_BT,
                                                            steps)

  def per_step(logits_BTVd, j):
    sl = lambda x: jax.lax.dynamic_slice_in_dim(x, j + 1, T, axis=1)  # noqa: E731
    return _step_terms(logits_BTVd, sl(p_pad), sl(tgt_pad), sl(w_pad)) + (jnp.sum(sl(lm_pad)),)

  ce_sum, correct, weight_sum, mask_sum = ttt_scan(draft_params, embed_VD, aux_BTA, tok_pad, per_step, cfg=cfg,
                                                   steps=steps, remat=remat)
  return _finish(ce_sum, correct, weight_sum, mask_sum, B=B, T=T, decay=decay, loss_norm=loss_norm)


def ttt_scan(draft_params: Any, embed_VD: jax.Array, aux_BTA: jax.Array, tok_pad_BX: jax.Array, per_step: Any, *,
             cfg: DraftConfig, steps: int, remat: bool = False) -> Any:
  """The R-step TTT forward as one lax.scan; `per_step(logits_BTVd, j)` reduces each step's draft logits (so the
  [R,B,T,Vd] logits never exist at once) and its outputs come back stacked over steps.

  Step j, row t: hidden = fc(aux[t]) at j=0 else the draft output of step j-1 at row t; input token
  tok_pad[t+j+1] (tok_pad holds the T tokens right-padded by at least R); RoPE position t+j.
  """
  B, T = aux_BTA.shape[:2]
  embed_VD = jax.lax.stop_gradient(embed_VD)
  t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  hidden0 = draft.fuse(draft_params, aux_BTA, cfg=cfg)

  def body(carry, j):
    hidden, kbufs, vbufs = carry
    kb, vb = list(kbufs), list(vbufs)  # one [R,B,T,K,H] buffer per draft layer

    def attend(i, q, k, v):
      kb[i] = jax.lax.dynamic_update_index_in_dim(kb[i], k.astype(kb[i].dtype), j, 0)
      vb[i] = jax.lax.dynamic_update_index_in_dim(vb[i], v.astype(vb[i].dtype), j, 0)
      return attention.ttt_attention(q, kb[i], vb[i], j, cfg.sliding_window)

    with jax.named_scope("ttt_step"):
      emb = jnp.take(embed_VD, jax.lax.dynamic_slice_in_dim(tok_pad_BX, j + 1, T, axis=1), axis=0)
      out = draft.run_layers(draft_params, emb, hidden, t_BT + j, attend, cfg=cfg)
      y = per_step(draft.logits(draft_params, out, cfg=cfg), j)
    return (out.astype(hidden.dtype), tuple(kb), tuple(vb)), y

  if remat:
    body = jax.checkpoint(body, prevent_cse=False)
  q_s, k_s, v_s = jax.eval_shape(lambda: draft.qkv(draft_params, jnp.take(embed_VD, tok_pad_BX[:, :T], axis=0),
                                                   hidden0, t_BT, cfg=cfg))
  kbufs = tuple(jnp.zeros((steps,) + k_s.shape, k_s.dtype) for _ in range(cfg.num_layers))
  vbufs = tuple(jnp.zeros((steps,) + v_s.shape, v_s.dtype) for _ in range(cfg.num_layers))
  return jax.lax.scan(body, (hidden0, kbufs, vbufs), jnp.arange(steps, dtype=jnp.int32))[1]


def ttt_ranks(draft_params: Any, embed_VD: jax.Array, aux_BTA: jax.Array, tokens_BT: jax.Array,
              vocab: DraftVocab, *, cfg: DraftConfig, steps: int, max_rank: int) -> jax.Array:
  """int32[R,B,T]: at step j, row t, the rank (1 = the draft's top choice) of token t+j+2 among the draft's
  candidates, 0 when it is outside the draft vocabulary or ranked below max_rank (or past the end).

  On the target's own greedy text the fed tokens are exactly the accepted path, so this is what tree drafting at
  depth j+1 meets once depths 1..j were accepted: the measurement behind the tree-shape choice (autotree).
  """
  B, T = tokens_BT.shape
  tok_pad = _shift_pad(tokens_BT, 0, T + steps + 2)
  inv_V = jnp.zeros(vocab.t2d.shape, jnp.int32).at[vocab.target_ids()].set(
      jnp.arange(vocab.d2t.shape[0], dtype=jnp.int32))

  def per_step(logits_BTVd, j):
    want = jax.lax.dynamic_slice_in_dim(tok_pad, j + 2, T, axis=1)
    own = jnp.take_along_axis(logits_BTVd, inv_V[want][..., None], axis=-1)
    rank = 1 + jnp.sum(logits_BTVd > own, axis=-1, dtype=jnp.int32)
    ok = vocab.t2d[want] & (rank <= max_rank) & (jnp.arange(T)[None, :] + j + 2 < T)
    return jnp.where(ok, rank, 0)

  return ttt_scan(draft_params, embed_VD, aux_BTA, tok_pad, per_step, cfg=cfg, steps=steps)


def simulated_tau(acc_R: jax.Array) -> jax.Array:
  """Acceptance length a chain draft would reach with these per-step accuracies: 1 + Σ_j Π_{i<=j} acc_i."""
  return 1.0 + jnp.sum(jnp.cumprod(acc_R, axis=-1), axis=-1)
