"""Target KV cache invariants: cached decoding == one full forward; a tree mask == running each visible path alone."""

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.target import llama
from eagle3_jax.nn import masks


def _full(params, cfg, toks):
  B, T = toks.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  return llama.forward(params, toks, pos, None, masks.causal_mask(jnp.full((B,), T), T), cfg=cfg)


def test_prefill_then_single_token_steps_equal_full_forward(tiny_cfg):
  params = llama.init_params(tiny_cfg, jax.random.key(0))
  B, T, T0, S = 2, 11, 5, 16
  toks = jax.random.randint(jax.random.key(1), (B, T), 0, tiny_cfg.vocab_size)
  logits_full, aux_full, _ = _full(params, tiny_cfg, toks)
  step = jax.jit(lambda p, t, pos, c, m: llama.forward(p, t, pos, c, m, cfg=tiny_cfg))
  cache = llama.init_cache(tiny_cfg, B, S)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  logits, aux, cache = step(params, toks[:, :T0], pos[:, :T0], cache, masks.cache_causal_mask(cache.lengths, T0, S))
  cache = cache.replace(lengths=cache.lengths + T0)
  outs, auxs = [logits], [aux]
  for t in range(T0, T):
    logits, aux, cache = step(params, toks[:, t:t + 1], pos[:, t:t + 1], cache,
                              masks.cache_causal_mask(cache.lengths, 1, S))
    cache = cache.replace(lengths=cache.lengths + 1)
    outs.append(logits)
    auxs.append(aux)
  np.testing.assert_allclose(np.concatenate(outs, 1), logits_full, atol=1e-4)
  np.testing.assert_allclose(np.concatenate(auxs, 1), aux_full, atol=1e-4)


def test_tree_mask_rows_equal_their_visible_path_alone(tiny_cfg):
  """Prefix of 4 tokens, then a 5-node tree: root r, children a, b of r, child c of a, child d of b."""
  params = llama.init_params(tiny_cfg, jax.random.key(2))
  prefix = jax.random.randint(jax.random.key(3), (1, 4), 0, tiny_cfg.vocab_size)
  nodes = jnp.array([[7, 11, 13, 17, 19]])
  parents = [-1, 0, 0, 1, 2]
  depth = [0, 1, 1, 2, 2]
  P, S = 5, 12
  anc = np.zeros((P, P), bool)
  for i in range(P):
    j = i
    while j >= 0:
      anc[i, j] = True
      j = parents[j]
  cache = llama.init_cache(tiny_cfg, 1, S)
  _, _, cache = llama.forward(params, prefix, jnp.arange(4)[None], cache, masks.cache_causal_mask(cache.lengths, 4, S),
                              cfg=tiny_cfg)
  cache = cache.replace(lengths=cache.lengths + 4)
  mask = masks.block_mask(cache.lengths, jnp.asarray(anc)[None], S)
  logits, _, _ = llama.forward(params, nodes, 4 + jnp.asarray(depth)[None], cache, mask, cfg=tiny_cfg)
  for i in range(P):
    path = [j for j in range(P) if anc[i, j]]  # ancestors in index order == root-to-node order here
    seq = jnp.concatenate([prefix, nodes[:, path]], axis=1)
    alone, _, _ = _full(params, tiny_cfg, seq)
    np.testing.assert_allclose(logits[0, i], alone[0, -1], atol=1e-4)
