"""A second model family through the target protocol (tests/neox_family.py: GPT-NeoX style, LayerNorm with bias,
partial rotary, parallel residual, slot-major cache): vanilla decoding equals a plain full forward, a draft trains
against it through the normal training loop, and with that draft greedy speculative output equals vanilla at B = 1
and 4 while sampling keeps the target's distribution."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import neox_family as neox
from eagle3_jax import interop
from eagle3_jax.config import load_config
from eagle3_jax.decode import engine, sampling, speculative, vanilla
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.nn import masks
from eagle3_jax.train import loop

CFG = neox.NeoXConfig()  # vocab 100: the character tokenizer of configs/tiny.py
TINY = pathlib.Path(__file__).parent.parent / "configs" / "tiny.py"
GREEDY = sampling.SamplingConfig()


@pytest.fixture(scope="module")
def params():
  return neox.init_params(CFG, jax.random.key(0))


def _prompts(B, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 12, B)
  tokens = np.zeros((B, int(lengths.max())), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(4, CFG.vocab_size, n)
  return tokens, lengths.astype(np.int32)


def _vanilla(params, tokens, lengths, max_new):
  target = CFG.as_target()
  B, T = tokens.shape
  state = vanilla.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths),
                               target.init_cache(B, vanilla.cache_length(T, max_new), jnp.float32),
                               jax.random.key(0), target=target, sampling_cfg=GREEDY, max_new_tokens=max_new)
  return np.asarray(state.tokens), np.asarray(state.counts)


def test_vanilla_decoding_through_the_protocol_equals_full_forwards(params):
  tokens, lengths = _prompts(3)
  got, counts = _vanilla(params, tokens, lengths, 6)
  assert (counts == 6).all()
  fwd = jax.jit(neox.forward, static_argnames="cfg")
  for b in range(3):
    seq = list(tokens[b, :lengths[b]])
    for _ in range(6):
      T = len(seq)
      logits, _, _ = fwd(params, jnp.asarray([seq]), jnp.arange(T)[None], None,
                         masks.causal_mask(jnp.array([T]), T), cfg=CFG)
      seq.append(int(jnp.argmax(logits[0, -1])))
    assert list(got[b]) == seq[lengths[b]:], b


def test_engine_vanilla_generator_takes_a_target(params):
  tokens, lengths = _prompts(2, seed=1)
  gen = engine.VanillaGenerator(params, CFG.as_target(), sampling_cfg=GREEDY, max_new_tokens=5)
  out = gen.generate(engine.Batch(tokens=tokens, lengths=lengths, n_real=2))
  np.testing.assert_array_equal(out.tokens, _vanilla(params, tokens, lengths, 5)[0])


@pytest.fixture(scope="module")
def trained(params, tmp_path_factory):
  """A draft trained against the NeoX target by the normal loop (configs/tiny.py data and tokenizer)."""
  run = tmp_path_factory.mktemp("neox_run")
  cfg = load_config(TINY, [f"run_dir={run}", "num_steps=80", "log_every=1", "eval_every=0", "progress=false",
                           "checkpoint_every=1000", "draft.draft_vocab_size=100", "data.max_length=64"])
  summary = loop.train(cfg, target=(CFG, params))
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  return summary, [r for r in rows if r["split"] == "train"]


def test_a_draft_trains_against_the_second_family(trained):
  summary, rows = trained
  assert summary["step"] == 80 and [r["step"] for r in rows] == list(range(1, 81))
  ce = lambda rs: np.mean([r["ce_j"][0] for r in rs])  # noqa: E731
  assert ce(rows[-10:]) < ce(rows[:10]) - 0.05, (ce(rows[:10]), ce(rows[-10:]))
  ckpt = interop.read_draft(summary["export_dir"])
  assert ckpt.aux_layer_ids == CFG.aux_layers and ckpt.extra["verifier_architectures"] == [CFG.architecture]


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("tree", [TreeConfig.chain(3), TreeConfig(top_k=2, depth=3, total_tokens=6)],
                         ids=lambda t: t.shape)
def test_greedy_speculative_equals_vanilla_with_the_trained_draft(params, trained, B, tree):
  ckpt = interop.read_draft(trained[0]["export_dir"])
  tokens, lengths = _prompts(B, seed=2)
  spec = speculative.SpecConfig(tree=tree, sampling=GREEDY, max_new_tokens=12)
  state = speculative.generate(CFG.as_target(), params, jax.tree.map(jnp.asarray, ckpt.params), ckpt.vocab,
                               tokens, lengths, jax.random.key(1), dcfg=ckpt.cfg, spec=spec)
  out = speculative.outputs(state, spec)
  want, counts = _vanilla(params, tokens, lengths, 12)
  np.testing.assert_array_equal(out["counts"], counts)
  np.testing.assert_array_equal(out["tokens"], want)
  assert (out["tau"] >= 1).all()


def test_engine_speculative_generator_takes_a_target(params, trained):
  ckpt = interop.read_draft(trained[0]["export_dir"])
  tokens, lengths = _prompts(4, seed=4)
  batch = engine.Batch(tokens=tokens, lengths=lengths, n_real=4)
  spec = engine.SpeculativeGenerator(params, CFG.as_target(), jax.tree.map(jnp.asarray, ckpt.params), ckpt.vocab,
                                     dcfg=ckpt.cfg, tree_cfg=TreeConfig.chain(2), sampling_cfg=GREEDY,
                                     max_new_tokens=8)
  plain = engine.VanillaGenerator(params, CFG.as_target(), sampling_cfg=GREEDY, max_new_tokens=8)
  np.testing.assert_array_equal(spec.generate(batch).tokens, plain.generate(batch).tokens)


def test_sampling_keeps_the_target_distribution(params, trained):
  """The first two emitted tokens of many rows (T = 1, chain of 2) follow p(t1) p(t2 | t1) (chi-square)."""
  ckpt = interop.read_draft(trained[0]["export_dir"])
  scfg = sampling.SamplingConfig(temperature=1.0, top_k=4)  # a small support keeps the test statistically sharp
  prompt = np.array([10, 20, 30, 40], np.int32)
  rows = 3000
  spec = speculative.SpecConfig(tree=TreeConfig.chain(2), sampling=scfg, max_new_tokens=2)
  state = speculative.generate(CFG.as_target(), params, jax.tree.map(jnp.asarray, ckpt.params), ckpt.vocab,
                               np.broadcast_to(prompt, (rows, 4)), np.full((rows,), 4), jax.random.key(3),
                               dcfg=ckpt.cfg, spec=spec)
  out = speculative.outputs(state, spec)["tokens"][:, :2]
  # Exact p(t1, t2) from full forwards over every continuation t1 of the prompt.
  V = CFG.vocab_size
  seqs = np.concatenate([np.broadcast_to(prompt, (V, 4)), np.arange(V)[:, None]], axis=1)
  logits, _, _ = neox.forward(params, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(5), (V, 5)), None,
                              masks.causal_mask(jnp.full((V,), 5), 5), cfg=CFG)
  probs = np.asarray(sampling.target_probs(logits[:, 3:], scfg), np.float64)  # [t1, 2, V]
  joint = probs[0, 0][:, None] * probs[:, 1]  # p(t1) p(t2 | t1)
  counts = np.zeros((V, V))
  np.add.at(counts, (out[:, 0], out[:, 1]), 1)
  assert counts[joint == 0].sum() == 0, "a token with zero target probability was emitted"
  expected = joint.reshape(-1) * rows
  big = expected >= 5
  obs = np.append(counts.reshape(-1)[big], counts.reshape(-1)[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  assert len(obs) >= 6, "degenerate target distribution: the test would not test anything"
  assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3
