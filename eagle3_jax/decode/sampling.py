"""Logit processing (temperature, top-k, top-p) and token sampling, shared by vanilla and speculative decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eagle3_jax.config import SamplingConfig


def _mask_below(logits: jax.Array, threshold: jax.Array) -> jax.Array:
  # Ties with the threshold are kept, so a filter may keep slightly more than k tokens but never fewer.
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _top_p_threshold(sorted_desc: jax.Array, top_p: float) -> jax.Array:
  """Smallest logit of the shortest descending prefix whose probability mass reaches top_p (keeps >= 1)."""
  probs = jax.nn.softmax(sorted_desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive: token i is kept if the mass before it < top_p
  keep = mass_before < top_p
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  return jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)


def process_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Log-probabilities [..., V] of the distribution `sample` draws from; -inf outside the kept set.

  Greedy (temperature 0) is the one-hot distribution on the argmax, so a verifier can treat greedy and sampled
  decoding alike.
  """
  logits = logits_BV.astype(jnp.float32)
  V = logits.shape[-1]
  if cfg.greedy:
    onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.bool_)
    return jnp.where(onehot, 0.0, -jnp.inf)
  logits = logits / cfg.temperature
  if 0 < cfg.top_k < V:
    # top_k sorts only k values, so top-p after top-k never needs a full-vocabulary sort.
    top_vals = jax.lax.top_k(logits, cfg.top_k)[0]
    threshold = top_vals[..., -1:]
    if cfg.top_p < 1.0:
      threshold = jnp.maximum(threshold, _top_p_threshold(top_vals, cfg.top_p))
    logits = _mask_below(logits, threshold)
  elif cfg.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    logits = _mask_below(logits, _top_p_threshold(sorted_desc, cfg.top_p))
  return jax.nn.log_softmax(logits, axis=-1)


def target_probs(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Probabilities [..., V] of the processed distribution (what lossless speculative acceptance compares to)."""
  return jnp.exp(process_logits(logits_BV, cfg))


def sample(key: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token id per row (int32 [...]): argmax when greedy, else a draw from `process_logits`."""
  with jax.named_scope("sample"):
    if cfg.greedy:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits_BV, cfg), axis=-1).astype(jnp.int32)


def split_sample(key: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """(next key, one token per row int32[B]) from logits [B, V]: one key for the whole batch (key []), or one per row
  (key [B]: continuous batching, where a request's tokens must not depend on its slot or its neighbours).

  Either way the key is split once per call and the second half is spent, so a row keyed alone draws what a
  batch of one under that key would.
  """
  if key.ndim == 0:
    key, sub = jax.random.split(key)
    return key, sample(sub, logits_BV, cfg)
  split = jax.vmap(jax.random.split)(key)  # [B, 2]: each row's next key, and this draw's
  return split[:, 0], jax.vmap(lambda k, row: sample(k, row[None], cfg)[0])(split[:, 1], logits_BV)
