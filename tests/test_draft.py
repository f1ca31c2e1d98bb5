"""Draft head: shapes, vocab buffers, and cached steps == one masked pass (the invariant tree drafting relies on)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.params import count_params
from eagle3_jax.nn import layers, masks


@pytest.fixture
def dcfg(tiny_cfg):
  return draft.DraftConfig.for_target(tiny_cfg, draft_vocab_size=48)


def test_param_count_matches_official_formula(dcfg):
  D, F, N, K, H = dcfg.hidden_size, dcfg.intermediate_size, dcfg.num_heads, dcfg.num_kv_heads, dcfg.head_dim
  expected = 3 * D * D + 2 * D * (N + 2 * K) * H + N * H * D + 3 * D * F + 4 * D + D * dcfg.draft_vocab_size
  assert count_params(draft.abstract_params(dcfg)) == expected


@pytest.mark.parametrize("window, num_layers", [(None, 1), (3, 1), (None, 3), (3, 2)],
                         ids=["full", "window3", "3layers", "window3_2layers"])
def test_cached_steps_equal_one_pass(dcfg, window, num_layers):
  """Also for a sliding-window layer (the window applies to cache slots, slot == position, as to the one pass) and
  for stacked layers (each with its own cache buffers)."""
  dcfg = dataclasses.replace(dcfg, sliding_window=window, num_layers=num_layers)
  params = draft.init_params(dcfg, jax.random.key(0))
  B, T, S = 2, 7, 12
  emb = jax.random.normal(jax.random.key(1), (B, T, dcfg.hidden_size))
  aux = jax.random.normal(jax.random.key(2), (B, T, 3 * dcfg.target_hidden_size))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  full, _ = draft.forward(params, emb, draft.fuse(params, aux, cfg=dcfg), pos, None,
                          masks.causal_mask(jnp.full((B,), T), T), cfg=dcfg)
  cache = draft.init_cache(dcfg, B, S)
  outs = []
  for t0, t1 in [(0, 4), (4, 5), (5, 7)]:
    mask = masks.cache_causal_mask(cache.lengths, t1 - t0, S)
    out, cache = draft.forward(params, emb[:, t0:t1], draft.fuse(params, aux[:, t0:t1], cfg=dcfg), pos[:, t0:t1], cache,
                               mask, cfg=dcfg)
    cache = cache.replace(lengths=cache.lengths + (t1 - t0))
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)
  assert draft.logits(params, full, cfg=dcfg).shape == (B, T, 48)
  if window is not None:  # the window really cut keys: the last rows differ from full attention
    plain, _ = draft.forward(params, emb, draft.fuse(params, aux, cfg=dcfg), pos, None,
                             masks.causal_mask(jnp.full((B,), T), T), cfg=dataclasses.replace(dcfg, sliding_window=None))
    np.testing.assert_allclose(plain[:, :window], full[:, :window], atol=1e-6)
    assert np.abs(np.asarray(plain[:, window:] - full[:, window:])).max(-1).min() > 1e-4  # every cut row


def test_vocab_mapping_round_trip():
  ids = np.array([0, 3, 4, 9, 11])
  vocab = DraftVocab.from_ids(ids, 16)
  np.testing.assert_array_equal(vocab.target_ids(), ids)
  np.testing.assert_array_equal(vocab.to_target(jnp.array([4, 0, 2])), [11, 0, 4])
  assert int(vocab.t2d.sum()) == 5 and bool(vocab.t2d[9]) and not bool(vocab.t2d[10])
  with pytest.raises(ValueError, match="ascending"):
    DraftVocab.from_ids(np.array([3, 1]), 16)


def test_norm_output_feeds_back_the_post_norm_hidden(dcfg):
  """EAGLE 3.1 (speculators' norm_output): the next step receives norm(h) instead of h; lm_head reads norm(h) in
  both, so one step's logits agree and only what is fed back differs."""
  params = draft.init_params(dcfg, jax.random.key(0))
  params["norm"] = params["norm"] + 0.3 * jax.random.normal(jax.random.key(3), params["norm"].shape)
  B, T = 2, 5
  emb = jax.random.normal(jax.random.key(1), (B, T, dcfg.hidden_size))
  aux = jax.random.normal(jax.random.key(2), (B, T, 3 * dcfg.target_hidden_size))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = masks.causal_mask(jnp.full((B,), T), T)
  cfg31 = dataclasses.replace(dcfg, norm_output=True)
  h, _ = draft.forward(params, emb, draft.fuse(params, aux, cfg=dcfg), pos, None, mask, cfg=dcfg)
  h31, _ = draft.forward(params, emb, draft.fuse(params, aux, cfg=cfg31), pos, None, mask, cfg=cfg31)
  np.testing.assert_allclose(h31, layers.rms_norm(h, params["norm"], dcfg.rms_norm_eps), atol=1e-5)
  np.testing.assert_allclose(draft.logits(params, h31, cfg=cfg31), draft.logits(params, h, cfg=dcfg), atol=1e-4)
  with pytest.raises(ValueError, match="mutually exclusive"):
    dataclasses.replace(dcfg, fc_norm=True, norm_before_fc=True)
