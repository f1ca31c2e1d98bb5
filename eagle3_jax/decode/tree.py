"""Static-shape EAGLE-2 dynamic draft trees: expand top_k x top_k per level, rerank to total_tokens, build masks."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from eagle3_jax.config import TreeConfig
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.nn import masks
from eagle3_jax.nn.kv_cache import KVCache


@flax.struct.dataclass
class Tree:
  """P draft nodes in level order below a root. Index 0 of the (P+1)-block is the root, node i sits at i + 1."""

  tokens: jax.Array  # int32[B,P] target-vocabulary ids
  scores: jax.Array  # float32[B,P] cumulative draft log-prob of the root-to-node path
  parents: jax.Array  # int32[B,P] index of the parent in the (P+1)-block (0 = root); always < own index
  depths: jax.Array  # int32[B,P] level of each node, 1..depth (RoPE offset from the root)
  mask: jax.Array  # bool[B,P+1,P+1] row i sees column j iff j is i or an ancestor of i


def build(scores_BC: jax.Array, tokens_BC: jax.Array, pool_parent_BC: jax.Array, cfg: TreeConfig) -> Tree:
  """Keeps the top total_tokens candidates by cumulative log-prob as a connected tree, in level order.

  A child's score is its parent's plus a log-prob <= 0 and parents sit at lower pool indices; lax.top_k breaks
  ties towards the lower index, so every selected node's parent is selected too. Sorting the selected pool indices
  gives level order (the pool is laid out level by level), with parents before children.
  """
  P = cfg.total_tokens
  _, sel = jax.lax.top_k(scores_BC, P)
  sel = jnp.sort(sel, axis=-1)
  tokens = jnp.take_along_axis(tokens_BC, sel, axis=-1)
  scores = jnp.take_along_axis(scores_BC, sel, axis=-1)
  depths = jnp.asarray(cfg.pool_depths())[sel]
  pool_parent = jnp.take_along_axis(pool_parent_BC, sel, axis=-1)  # -1 for depth-1 nodes
  is_parent = sel[:, None, :] == pool_parent[:, :, None]  # [B,P(child),P(candidate parent)]
  parents = jnp.where(is_parent.any(-1), jnp.argmax(is_parent, axis=-1) + 1, 0).astype(jnp.int32)
  return Tree(tokens=tokens.astype(jnp.int32), scores=scores, parents=parents, depths=depths,
              mask=masks.ancestor_mask(parents, cfg.max_accept))


def expand(draft_params: Any, embed_VD: jax.Array, vocab: DraftVocab, last_BD: jax.Array, cache: KVCache, *,
           dcfg: draft.DraftConfig, cfg: TreeConfig) -> tuple[Tree, KVCache]:
  """EAGLE-2 expansion from the draft hidden of the last committed row (the row whose token is the root).

  Level 1 = top_k of the root's draft distribution. Each further level forwards the current top_k frontier (all at
  one RoPE position, tree-masked over the committed draft prefix), records all top_k^2 children with cumulative
  log-probs and keeps the best top_k as the next frontier. Frontier K/V are written in a temporary block after
  cache.lengths and never committed (the next round's context pass overwrites them); the cache comes back with its
  lengths unchanged, so callers carry it on and the writes stay in place.
  """
  B, k, D = last_BD.shape[0], cfg.top_k, last_BD.shape[-1]
  S = cache.max_len
  base = cache.lengths
  Q = max((cfg.depth - 1) * k, 1)
  slot = jnp.arange(Q)
  with jax.named_scope("draft_expand"):
    logp = jax.nn.log_softmax(draft.logits(draft_params, last_BD, cfg=dcfg), axis=-1)
    f_score, f_idx = jax.lax.top_k(logp, k)
    f_tok = vocab.to_target(f_idx).astype(jnp.int32)
    first = (f_score, f_tok, jnp.full((B, k), -1, jnp.int32))

    def level_step(carry, level):
      # One scan step per level (not a Python unroll): the draft step compiles once, whatever the depth.
      cache, f_score, f_tok, f_hidden, f_pool, anc = carry
      positions = jnp.broadcast_to((base + level - 1)[:, None], (B, k))
      emb = jnp.take(embed_VD, f_tok, axis=0)
      mask = masks.block_mask(base, anc, S)
      out, cache = draft.forward(draft_params, emb, f_hidden, positions,
                                 cache.replace(lengths=base + (level - 1) * k), mask, cfg=dcfg)
      child_logp = jax.nn.log_softmax(draft.logits(draft_params, out, cfg=dcfg), axis=-1)
      c_score, c_idx = jax.lax.top_k(child_logp, k)  # [B,k,k]
      cum = (f_score[:, :, None] + c_score).reshape(B, k * k)
      c_tok = vocab.to_target(c_idx).reshape(B, k * k).astype(jnp.int32)
      record = (cum, c_tok, jnp.repeat(f_pool, k, axis=1))
      # The next frontier; unused after the last level.
      f_score, pick = jax.lax.top_k(cum, k)
      par = pick // k
      own = slot[None, None, :] == (level * k + jnp.arange(k))[None, :, None]
      carry = (cache, f_score, jnp.take_along_axis(c_tok, pick, axis=1),
               jnp.take_along_axis(out, par[:, :, None], axis=1).astype(f_hidden.dtype),
               (k + (level - 1) * k * k + pick).astype(jnp.int32),
               jnp.take_along_axis(anc, par[:, :, None], axis=1) | own)
      return carry, record

    carry = (cache, f_score, f_tok, jnp.broadcast_to(last_BD[:, None, :], (B, k, D)),
             jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (B, k)),
             jnp.broadcast_to(slot[None, None, :] == jnp.arange(k)[None, :, None], (B, k, Q)))
    carry, records = jax.lax.scan(level_step, carry, jnp.arange(1, cfg.depth, dtype=jnp.int32))
    cache = carry[0]
    # records: [depth-1, B, k*k] per field, laid out level by level after the k depth-1 candidates.
    pool = [jnp.concatenate([a, jnp.moveaxis(r, 0, 1).reshape(B, -1)], axis=1) for a, r in zip(first, records)]
    tree = build(*pool, cfg)
  return tree, cache.replace(lengths=base)
