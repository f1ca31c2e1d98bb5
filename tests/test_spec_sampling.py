"""Lossless sampling: over many rows with a fixed seed, the first emitted tokens follow the target's exact distribution,
whether the draft mostly agrees with the target or mostly disagrees (chi-square, tiny vocabulary)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import spec_oracle
from eagle3_jax.decode import sampling, speculative as sp
from eagle3_jax.target import llama
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.nn import masks
from eagle3_jax.target import protocol

V = 8
ROWS = 12000
PROMPT = np.array([3, 1, 4, 1])


def _exact(cfg, params, scfg):
  """p(t1), p(t2 | t1) and the marginal p(t3), from target forwards over every continuation of the prompt."""
  t1, t2 = np.meshgrid(np.arange(V), np.arange(V), indexing="ij")
  seqs = np.concatenate([np.broadcast_to(PROMPT, (V * V, len(PROMPT))), t1.reshape(-1, 1), t2.reshape(-1, 1)], 1)
  n, T = seqs.shape
  logits, _, _ = jax.jit(llama.forward, static_argnames="cfg")(
      params, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(T), (n, T)), None,
      masks.causal_mask(jnp.full((n,), T), T), cfg=cfg)
  probs = np.asarray(sampling.target_probs(logits[:, T - 3:], scfg), np.float64).reshape(V, V, 3, V)
  p1 = probs[0, 0, 0]
  p2 = probs[:, 0, 1]  # [t1, t2]
  p3 = np.einsum("a,ab,abc->c", p1, p2, probs[:, :, 2])
  return p1[:, None] * p2, p3


def _check(counts: np.ndarray, probs: np.ndarray):
  counts, expected = counts.reshape(-1), probs.reshape(-1) * counts.sum()
  assert counts[expected == 0].sum() == 0, "a token with zero target probability was emitted"
  big = expected >= 5  # pool the rare cells so the chi-square approximation holds
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  assert len(obs) >= 8, "degenerate target distribution: the test would not test anything"
  p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue  # probabilities were float32
  tv = 0.5 * np.abs(counts / counts.sum() - probs.reshape(-1)).sum()
  assert p_value > 1e-3 and tv < 0.05, (p_value, tv)


CASES = {
    # Bigram target, draft that copies it (proposals are the target's own top-k): most proposals are accepted.
    "agree": dict(context_scale=0.0, sign=1.0, scfg=sampling.SamplingConfig(temperature=1.0, top_k=6)),
    # Context-dependent target, draft proposing the bigram part's least likely tokens: mostly rejected.
    "disagree": dict(context_scale=30.0, sign=-1.0, scfg=sampling.SamplingConfig(temperature=1.0, top_p=0.95)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_first_tokens_follow_target_distribution(tiny_cfg, case):
  c = CASES[case]
  cfg = spec_oracle.bigram_config(dataclasses.replace(tiny_cfg, num_layers=2), V)
  # Seed 7: no single token dominates (max p(t1) ~ 0.3), so all 36-64 (t1, t2) cells get counts.
  tparams = spec_oracle.bigram_target(cfg, 7, logit_scale=1.5, context_scale=c["context_scale"])
  dcfg, dparams, vocab = spec_oracle.copy_draft(cfg, tparams, sign=c["sign"])
  spec = sp.SpecConfig(tree=TreeConfig(top_k=2, depth=3, total_tokens=5), sampling=c["scfg"], max_new_tokens=3)
  tokens = np.broadcast_to(PROMPT, (ROWS, len(PROMPT)))
  state = sp.generate(protocol.llama_target(cfg), tparams, dparams, vocab, tokens, np.full((ROWS,), len(PROMPT)),
                      jax.random.key(0), dcfg=dcfg, spec=spec)
  out = sp.outputs(state, spec)
  assert (out["counts"] == 3).all()
  joint, p3 = _exact(cfg, tparams, c["scfg"])
  emitted = out["tokens"]
  _check(np.bincount(emitted[:, 0] * V + emitted[:, 1], minlength=V * V), joint)
  _check(np.bincount(emitted[:, 2], minlength=V), p3)
  # The draft really agreed / disagreed: mean accepted draft tokens in the first round.
  accepted = out["tau"].mean() - 1
  assert (accepted > 0.8) if case == "agree" else (accepted < 0.5), accepted
