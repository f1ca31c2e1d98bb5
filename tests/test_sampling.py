"""Logit processing matches transformers' warpers; samples follow the processed distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.decode import sampling
from eagle3_jax.decode.sampling import SamplingConfig


def _kept(cfg, logits):
  return np.isfinite(np.asarray(sampling.process_logits(jnp.asarray(logits, jnp.float32), cfg)))


def test_greedy_is_one_hot_on_argmax_and_sample_is_argmax():
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  probs = np.asarray(sampling.target_probs(logits, SamplingConfig()))
  np.testing.assert_array_equal(probs, np.eye(50)[np.argmax(logits, -1)])
  np.testing.assert_array_equal(sampling.sample(jax.random.key(1), logits, SamplingConfig()),
                                np.argmax(logits, -1))


def test_temperature_scales_logits():
  logits = jax.random.normal(jax.random.key(0), (2, 30)) * 3
  for t in (0.5, 1.0, 2.0):
    np.testing.assert_allclose(sampling.process_logits(logits, SamplingConfig(temperature=t)),
                               jax.nn.log_softmax(logits / t), rtol=1e-5, atol=1e-6)


def test_top_k_keeps_exactly_the_k_largest():
  logits = jax.random.normal(jax.random.key(2), (4, 64))
  kept = _kept(SamplingConfig(temperature=1.0, top_k=5), logits)
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  expected = np.zeros_like(kept)
  np.put_along_axis(expected, top5, True, axis=-1)
  np.testing.assert_array_equal(kept, expected)
  assert _kept(SamplingConfig(temperature=1.0, top_k=1000), logits).all()  # k >= V disables the filter


@pytest.mark.parametrize("top_p, n_kept", [(0.45, 1), (0.55, 2), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, n_kept):
  logits = np.log([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
  kept = _kept(SamplingConfig(temperature=1.0, top_p=top_p), logits)[0]
  assert kept.sum() == n_kept
  assert kept[np.argsort(-logits[0])[:n_kept]].all()
  probs = np.asarray(sampling.target_probs(jnp.asarray(logits, jnp.float32), SamplingConfig(temperature=1.0,
                                                                                            top_p=top_p)))
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)  # renormalised over what is kept


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7, top_k=10),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=0.9, top_k=20, top_p=0.7),
])
def test_matches_transformers_warpers(cfg):
  torch = pytest.importorskip("torch")
  from transformers.generation import logits_process as lp

  logits = np.asarray(jax.random.normal(jax.random.key(3), (5, 200)) * 2.0)
  warpers = [lp.TemperatureLogitsWarper(cfg.temperature)]
  if cfg.top_k:
    warpers.append(lp.TopKLogitsWarper(cfg.top_k))
  if cfg.top_p < 1.0:
    warpers.append(lp.TopPLogitsWarper(cfg.top_p))
  scores = torch.from_numpy(logits.copy())
  for w in warpers:
    scores = w(None, scores)
  expected = torch.softmax(scores, dim=-1).numpy()
  np.testing.assert_allclose(sampling.target_probs(jnp.asarray(logits), cfg), expected, atol=1e-6)


def test_samples_follow_the_processed_distribution():
  logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5]])
  n = 40_000
  for cfg in (SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.6, top_k=4),
              SamplingConfig(temperature=1.5, top_p=0.75)):
    probs = np.asarray(sampling.target_probs(logits, cfg))[0]
    draws = jax.vmap(lambda k: sampling.sample(k, logits, cfg))(jax.random.split(jax.random.key(4), n))[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=8) / n
    assert (freq[probs == 0] == 0).all(), f"{cfg}: sampled a filtered token"
    # Total variation of an n-sample empirical distribution over 8 outcomes is ~0.005 here; 0.015 is a 3x margin.
    assert 0.5 * np.abs(freq - probs).sum() < 0.015, (cfg, freq, probs)
    kept = probs > 0
    chi2 = n * ((freq[kept] - probs[kept]) ** 2 / probs[kept]).sum()
    assert chi2 < 30.0, (cfg, chi2)  # df <= 7: p(chi2 > 30) < 1e-4


@pytest.mark.parametrize("kwargs, field", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                                           ({"top_k": 2.5}, "top_k")])
def test_bad_config_raises(kwargs, field):
  with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
    SamplingConfig(**kwargs)


def test_config_is_static_and_hashable():
  assert hash(SamplingConfig(temperature=0.5)) == hash(SamplingConfig(temperature=0.5))
  f = jax.jit(sampling.sample, static_argnames="cfg")
  assert f(jax.random.key(0), jnp.zeros((1, 4)).at[0, 2].set(1.0), cfg=SamplingConfig()).tolist() == [2]
