"""Continuous batching with a draft: each request's greedy tokens equal plain decoding of it alone, whatever its slot
and neighbours (ragged acceptance, stops, cache growth); sampled requests keep their own keys (the same tokens with 1
slot or 4) and their tokens follow the target's distribution; admissions never recompile."""

import dataclasses

import jax
import numpy as np
import pytest

import spec_oracle
import test_spec_sampling as ss
from eagle3_jax.decode import batching, sampling
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.target import protocol
from test_batching import _cut, _prompts
from test_decode import M, _reference, cfg, params  # noqa: F401  (cfg, params: test_decode's fixtures)

V = 16  # the copy construction needs vocab_size <= head_dim


def _batcher(params, cfg, pair, tree, **kw):
  dcfg, dparams, vocab = pair
  kw = dict(slots=3, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=M, sync_every=2) | kw
  return batching.ContinuousBatcher(params, protocol.llama_target(cfg), draft_params=dparams, vocab=vocab,
                                    dcfg=dcfg, tree_cfg=tree, **kw)


@pytest.fixture
def copying(cfg, params):
  """A draft that copies the target's bigram part on a bigram-plus-context target: acceptance is partial and ragged."""
  bcfg = spec_oracle.bigram_config(cfg, V)
  tparams = spec_oracle.bigram_target(bcfg, 0, context_scale=30.0)
  return bcfg, tparams, spec_oracle.copy_draft(bcfg, tparams)


@pytest.mark.parametrize("tree", [TreeConfig.chain(3), TreeConfig(top_k=2, depth=3, total_tokens=6)],
                         ids=["chain3", "k2d3n6"])
def test_greedy_requests_decode_as_plain_decoding_alone(copying, tree):
  bcfg, tparams, pair = copying
  prompts = _prompts(9, seed=0, V=V)
  alone = [_reference(tparams, bcfg, p, M) for p in prompts]
  stop = alone[2][5]  # a token some row emits mid-answer: that row stops early and its slot is refilled
  b = _batcher(tparams, bcfg, pair, tree, stop_ids=(stop,))
  out, stats = b.run(prompts)
  assert out == [_cut(a, {stop}) for a in alone]
  assert any(len(o) < M for o in out) and stats["admissions"] == len(prompts)
  assert stats["accepted"] / stats["rounds"] > 1.3, stats  # drafts were really accepted, unevenly across rows
  assert 0 < stats["utilisation"] <= 1 and stats["tokens"] == sum(map(len, out))


def test_cache_grows_mid_answer_and_nothing_recompiles_over_hundreds_of_admissions(copying):
  bcfg, tparams, pair = copying
  tree = TreeConfig(top_k=2, depth=2, total_tokens=4)
  prompts = _prompts(5, seed=4, low=2, high=6, V=V) + _prompts(2, seed=5, low=17, high=22, V=V)
  b = _batcher(tparams, bcfg, pair, tree, slots=4, admit_order="shortest")
  out, stats = b.run(prompts)
  assert stats["grows"] >= 1 and out == [_reference(tparams, bcfg, p, M) for p in prompts]
  many = _prompts(200, seed=2, high=30, V=V)
  b = _batcher(tparams, bcfg, pair, tree, slots=4, max_new_tokens=3, admit_group=4)
  out, stats = b.run(many)
  assert stats["admissions"] == 200 and all(len(o) == 3 for o in out)
  # An admission per (cache size, bucket, group size), a round loop per size, a grow per size change: all warm-up.
  first = b.compile_count
  assert first == len(b._compiled)
  again, _ = b.run(many)
  assert again == out and b.compile_count == first


def test_longest_first_shrinks_both_caches_under_running_rows(copying):
  bcfg, tparams, pair = copying
  tree = TreeConfig(top_k=2, depth=2, total_tokens=4)
  long = _prompts(1, seed=5, low=17, high=22, V=V)
  short = _prompts(6, seed=8, low=2, high=6, V=V)  # a seed whose short answers avoid the stop token (checked below)
  prompts = short[:3] + long + short[3:]
  alone = [_reference(tparams, bcfg, p, M) for p in prompts]
  stop = alone[3][1]  # the long request stops early, the short ones run on (checked: the test means nothing else)
  first_stop = [next((j for j, t in enumerate(a) if t == stop), M) for a in alone]
  assert all(first_stop[i] > 4 for i in (0, 1, 2, 4, 5, 6)), first_stop
  out, stats = _batcher(tparams, bcfg, pair, tree, slots=3, admit_order="longest", stop_ids=(stop,)).run(prompts)
  assert stats["shrinks"] >= 1 and out == [_cut(a, {stop}) for a in alone]


def test_sampled_requests_keep_their_own_key(copying):
  bcfg, tparams, pair = copying
  hot = sampling.SamplingConfig(temperature=1.0)
  tree = TreeConfig(top_k=2, depth=3, total_tokens=6)
  prompts = _prompts(7, seed=1, V=V)
  many, _ = _batcher(tparams, bcfg, pair, tree, slots=4, sampling_cfg=hot, seed=5, admit_group=2).run(prompts)
  one, _ = _batcher(tparams, bcfg, pair, tree, slots=1, sampling_cfg=hot, seed=5, sync_every=3).run(prompts)
  assert many == one and len({tuple(r) for r in many}) == len(many)


def test_sampled_tokens_follow_the_target_distribution(tiny_cfg):
  """test_spec_sampling's chi-square check, through slots: many requests of one prompt, each with its own key."""
  c = ss.CASES["disagree"]
  bcfg = spec_oracle.bigram_config(dataclasses.replace(tiny_cfg, num_layers=2), ss.V)
  tparams = spec_oracle.bigram_target(bcfg, 7, logit_scale=1.5, context_scale=c["context_scale"])
  pair = spec_oracle.copy_draft(bcfg, tparams, sign=c["sign"])
  rows = 4000
  b = _batcher(tparams, bcfg, pair, TreeConfig(top_k=2, depth=3, total_tokens=5), slots=64, admit_group=64,
               sampling_cfg=c["scfg"], max_new_tokens=3, sync_every=4)
  out, _ = b.run([list(ss.PROMPT)] * rows)
  emitted = np.array(out)
  assert emitted.shape == (rows, 3)
  joint, p3 = ss._exact(bcfg, tparams, c["scfg"])
  ss._check(np.bincount(emitted[:, 0] * ss.V + emitted[:, 1], minlength=ss.V * ss.V), joint)
  ss._check(np.bincount(emitted[:, 2], minlength=ss.V), p3)


def test_incomplete_draft_arguments_raise(cfg, params):
  with pytest.raises(ValueError, match="needs draft_params, vocab, dcfg and tree_cfg"):
    batching.ContinuousBatcher(params, protocol.llama_target(cfg), slots=2, sampling_cfg=sampling.SamplingConfig(),
                               max_new_tokens=4, draft_params={"fc": np.zeros((3, 3))})
