"""Draft trees: reranking keeps a connected top-P tree, masks are ancestor-closed, the draft-side expansion scores equal
sequential draft decoding, and target tree-verify logits equal sequential decoding of every root-to-node path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.decode import tree
from eagle3_jax.target import llama
from eagle3_jax.nn import masks


def _numpy_pool(rng, cfg: tree.TreeConfig, B: int):
  """A candidate pool laid out as tree.expand lays it out (children score = parent + log-prob)."""
  k = cfg.top_k
  scores, parents = [], []
  for _ in range(B):
    s1 = -np.sort(rng.exponential(size=k))
    row_s, row_p = [s1], [np.full(k, -1)]
    f_score, f_pool = s1, np.arange(k)
    for level in range(1, cfg.depth):
      child = f_score[:, None] - np.sort(rng.exponential(size=(k, k)), axis=1)
      row_s.append(child.reshape(-1))
      row_p.append(np.repeat(f_pool, k))
      pick = np.argsort(-child.reshape(-1), kind="stable")[:k]
      f_score, f_pool = child.reshape(-1)[pick], k + (level - 1) * k * k + pick
    scores.append(np.concatenate(row_s))
    parents.append(np.concatenate(row_p))
  return np.stack(scores).astype(np.float32), np.stack(parents).astype(np.int32)


def test_config_errors():
  assert tree.TreeConfig(top_k=2, depth=3, total_tokens=10).num_candidates == 10
  with pytest.raises(ValueError, match="total_tokens=11 exceeds the 10 candidates"):
    tree.TreeConfig(top_k=2, depth=3, total_tokens=11)
  with pytest.raises(ValueError, match="top_k"):
    tree.TreeConfig(top_k=0, depth=3, total_tokens=1)
  chain = tree.TreeConfig.chain(5)
  assert chain.is_chain and chain.max_accept == 5 and chain.num_candidates == 5


def test_build_matches_numpy_reference():
  cfg = tree.TreeConfig(top_k=3, depth=3, total_tokens=8)
  B = 3
  scores, pool_parent = _numpy_pool(np.random.default_rng(0), cfg, B)
  C = cfg.num_candidates
  tokens = np.broadcast_to(np.arange(C, dtype=np.int32), (B, C))  # token = pool index, to read the selection back
  t = jax.jit(tree.build, static_argnames="cfg")(jnp.asarray(scores), jnp.asarray(tokens), jnp.asarray(pool_parent),
                                                 cfg=cfg)
  depth_of = cfg.pool_depths()
  for b in range(B):
    sel = np.sort(np.argsort(-scores[b], kind="stable")[:cfg.total_tokens])
    np.testing.assert_array_equal(t.tokens[b], sel)
    np.testing.assert_array_equal(t.depths[b], depth_of[sel])
    np.testing.assert_allclose(t.scores[b], scores[b, sel])
    parents = np.array([0 if pool_parent[b, s] < 0 else 1 + int(np.flatnonzero(sel == pool_parent[b, s])[0])
                        for s in sel])
    np.testing.assert_array_equal(t.parents[b], parents)
    assert (parents < np.arange(1, len(sel) + 1)).all()  # connected, parents before children
    P1 = len(sel) + 1
    anc = np.eye(P1, dtype=bool)
    for i in range(1, P1):
      anc[i] |= anc[parents[i - 1]]
    np.testing.assert_array_equal(t.mask[b], anc)


def test_block_mask():
  rows = np.zeros((1, 2, 3), bool)
  rows[0, 0, 0] = True
  rows[0, 1, [0, 2]] = True
  m = np.asarray(masks.block_mask(jnp.array([2]), jnp.asarray(rows), 7))
  np.testing.assert_array_equal(m[0, 0], [1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(m[0, 1], [1, 1, 1, 0, 1, 0, 0])


def _path(mask_row: np.ndarray, tokens_with_root: np.ndarray) -> np.ndarray:
  """Tokens of the root-to-node path: the ancestors in a level-ordered block are in increasing index order."""
  return tokens_with_root[np.flatnonzero(mask_row)]


def test_verify_logits_equal_sequential_decoding(tiny_cfg):
  params = llama.init_params(tiny_cfg, jax.random.key(0))
  cfg = tree.TreeConfig(top_k=2, depth=3, total_tokens=7)
  rng = np.random.default_rng(1)
  B, T, S = 2, 6, 24
  lengths = np.array([6, 3])
  prompts = rng.integers(0, tiny_cfg.vocab_size, (B, T))
  scores, pool_parent = _numpy_pool(rng, cfg, B)
  pool_tokens = rng.integers(0, tiny_cfg.vocab_size, scores.shape)
  t = tree.build(jnp.asarray(scores), jnp.asarray(pool_tokens), jnp.asarray(pool_parent), cfg)
  root = rng.integers(0, tiny_cfg.vocab_size, (B,))

  cache = llama.init_cache(tiny_cfg, B, S)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  _, _, cache = llama.forward(params, jnp.asarray(prompts), pos, cache, masks.cache_causal_mask(cache.lengths, T, S),
                              cfg=tiny_cfg)
  L = jnp.asarray(lengths, jnp.int32)
  block = jnp.concatenate([jnp.asarray(root)[:, None], t.tokens], axis=1)
  positions = L[:, None] + jnp.concatenate([jnp.zeros((B, 1), jnp.int32), t.depths], axis=1)
  verify, _, _ = llama.forward(params, block, positions, cache.replace(lengths=L),
                               masks.block_mask(L, t.mask, S), cfg=tiny_cfg)

  # Every node's path, run from scratch as one right-padded batch of plain causal sequences.
  seqs, ends, where = [], [], []
  for b in range(B):
    for i in range(cfg.total_tokens + 1):
      seq = np.concatenate([prompts[b, :lengths[b]], _path(np.asarray(t.mask[b, i]), np.asarray(block[b]))])
      seqs.append(np.pad(seq, (0, T + cfg.depth + 1 - len(seq))))
      ends.append(len(seq))
      where.append((b, i))
  seqs, ends = np.stack(seqs), np.array(ends)
  n = len(seqs)
  full, _, _ = jax.jit(llama.forward, static_argnames="cfg")(
      params, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape), None,
      masks.causal_mask(jnp.asarray(ends), seqs.shape[1]), cfg=tiny_cfg)
  expected = np.asarray(full)[np.arange(n), ends - 1]
  got = np.stack([np.asarray(verify)[b, i] for b, i in where])
  np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_expand_scores_equal_sequential_draft(tiny_cfg):
  """Tree-masked expansion over the draft cache == decoding each root-to-node path one committed step at a time."""
  dcfg = draft.DraftConfig.for_target(tiny_cfg, draft_vocab_size=40)
  dparams = draft.init_params(dcfg, jax.random.key(3))
  # A sharper random draft, so that reranking has clear winners.
  dparams["lm_head"] = dparams["lm_head"] * 40
  embed = 0.5 * jax.random.normal(jax.random.key(4), (tiny_cfg.vocab_size, dcfg.hidden_size))
  ids = np.sort(np.random.default_rng(5).choice(tiny_cfg.vocab_size, 40, replace=False))
  vocab = DraftVocab.from_ids(ids, tiny_cfg.vocab_size)
  cfg = tree.TreeConfig(top_k=3, depth=3, total_tokens=9)
  B, n_ctx, S = 2, 5, 32
  ctx_hidden = jax.random.normal(jax.random.key(6), (B, n_ctx, dcfg.hidden_size))
  ctx_emb = jax.random.normal(jax.random.key(7), (B, n_ctx, dcfg.hidden_size))
  cache = draft.init_cache(dcfg, B, S)
  out, cache = draft.forward(dparams, ctx_emb, ctx_hidden, jnp.broadcast_to(jnp.arange(n_ctx), (B, n_ctx)), cache,
                             masks.cache_causal_mask(cache.lengths, n_ctx, S), cfg=dcfg)
  cache = cache.replace(lengths=jnp.full((B,), n_ctx, jnp.int32))
  last = out[:, -1]
  t, after = jax.jit(tree.expand, static_argnames=("dcfg", "cfg"))(dparams, embed, vocab, last, cache, dcfg=dcfg,
                                                                    cfg=cfg)
  np.testing.assert_array_equal(after.lengths, cache.lengths)

  @jax.jit
  def step(hidden, token, c):
    o, c = draft.forward(dparams, embed[token][:, None], hidden[:, None], c.lengths[:, None], c,
                         masks.cache_causal_mask(c.lengths, 1, S), cfg=dcfg)
    return o[:, 0], c.replace(lengths=c.lengths + 1)

  logp = lambda h: np.asarray(jax.nn.log_softmax(draft.logits(dparams, h, cfg=dcfg), axis=-1))
  for b in range(B):
    row_cache = jax.tree.map(lambda x: x[b:b + 1], cache)
    for i in range(cfg.total_tokens):
      path = np.asarray(t.tokens[b])[np.flatnonzero(np.asarray(t.mask[b, i + 1, 1:]))]
      hidden, c, score = last[b:b + 1], row_cache, 0.0
      for depth, token in enumerate(path):
        score += logp(hidden)[0, np.searchsorted(ids, token)]
        if depth + 1 < len(path):
          hidden, c = step(hidden, jnp.array([token]), c)
      np.testing.assert_allclose(float(t.scores[b, i]), score, atol=1e-4, rtol=1e-5)
