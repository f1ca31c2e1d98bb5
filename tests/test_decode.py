"""Vanilla decoding: cached generate == step-by-step full forward, per-row stops, one compile per shape, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.decode import vanilla, engine, sampling
from eagle3_jax.target import llama
from eagle3_jax.nn import masks
from eagle3_jax.target import protocol

GREEDY = sampling.SamplingConfig()
M = 10  # max_new_tokens


@pytest.fixture
def cfg(tiny_cfg):
  return dataclasses.replace(tiny_cfg, num_layers=2, max_position_embeddings=64)


@pytest.fixture
def params(cfg):
  # Std 0.02 weights give near-uniform logits; a larger scale makes argmax ties (and flaky comparisons) unlikely.
  p = llama.init_params(cfg, jax.random.key(0))
  return jax.tree.map(lambda x: x * 20.0 if x.ndim > 1 else x, p)


def _prompts(lengths, T, seed=0, V=128):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), T), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(0, V, n)
  return tokens, np.asarray(lengths, np.int32)


def _generate(params, cfg, tokens, lengths, *, key=None, sampling_cfg=GREEDY, max_new=M, stop_ids=(), pad_id=0):
  B, T = tokens.shape
  cache = llama.init_cache(cfg, B, vanilla.cache_length(T, max_new))
  vanilla.validate(tokens, lengths, target=protocol.llama_target(cfg), cache_len=cache.max_len, max_new_tokens=max_new)
  key = jax.random.key(1) if key is None else key
  return vanilla.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths), cache, key,
                              target=protocol.llama_target(cfg),
                             sampling_cfg=sampling_cfg, max_new_tokens=max_new, stop_ids=stop_ids, pad_id=pad_id)


@jax.jit(static_argnames="cfg")
def _last_logits(params, tokens_1T, length, *, cfg):
  """Logits at position length-1 of a full forward without a cache (padding past `length` is masked out)."""
  T = tokens_1T.shape[1]
  logits, _, _ = llama.forward(params, tokens_1T, jnp.arange(T)[None], None,
                               masks.causal_mask(length[None], T), cfg=cfg)
  return logits[:, length - 1]


def _reference(params, cfg, prompt, n, *, key=None, sampling_cfg=GREEDY):
  """No cache: re-run the whole sequence each step, with generate's key schedule (one split per token)."""
  seq = np.zeros((1, 32), np.int32)  # one padded shape: one compile for every step and row
  seq[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    logits = _last_logits(params, jnp.asarray(seq), jnp.int32(i), cfg=cfg)
    if key is None:
      seq[0, i] = int(jnp.argmax(logits[0]))
    else:
      key, sub = jax.random.split(key)
      seq[0, i] = int(sampling.sample(sub, logits, sampling_cfg)[0])
  return seq[0, len(prompt):len(prompt) + n].tolist()


@pytest.mark.parametrize("lengths", [[7], [5, 13, 2]])
def test_greedy_generate_matches_full_forward_argmax(params, cfg, lengths):
  tokens, lengths = _prompts(lengths, T=16)
  state = _generate(params, cfg, tokens, lengths)
  np.testing.assert_array_equal(np.asarray(state.counts), M)
  for b, n in enumerate(lengths):
    assert np.asarray(state.tokens[b]).tolist() == _reference(params, cfg, tokens[b, :n], M), f"row {b}"
  # Invariant: the cache holds the prompt and every emitted token but the last.
  np.testing.assert_array_equal(np.asarray(state.cache.lengths), lengths + M - 1)
  assert int(state.steps) == M - 1


def test_sampled_generate_matches_reference_key_schedule(params, cfg):
  cfg_s = sampling.SamplingConfig(temperature=0.8, top_k=40, top_p=0.9)
  tokens, lengths = _prompts([6], T=8, seed=3)
  key = jax.random.key(7)
  state = _generate(params, cfg, tokens, lengths, key=key, sampling_cfg=cfg_s)
  assert np.asarray(state.tokens[0]).tolist() == _reference(params, cfg, tokens[0, :6], M, key=key,
                                                            sampling_cfg=cfg_s)
  assert not np.array_equal(jax.random.key_data(state.key), jax.random.key_data(key)), "key must advance"
  other = _generate(params, cfg, tokens, lengths, key=jax.random.key(8), sampling_cfg=cfg_s)
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(state.tokens))


def test_stop_id_stops_its_row_and_pads_after(params, cfg):
  tokens, lengths = _prompts([5, 9, 3], T=16, seed=1)
  free = np.asarray(_generate(params, cfg, tokens, lengths).tokens)
  stop = int(free[0, 3])  # row 0 emits this as its 4th token
  pad = 127
  state = _generate(params, cfg, tokens, lengths, stop_ids=(stop,), pad_id=pad)
  out, counts = np.asarray(state.tokens), np.asarray(state.counts)
  for b in range(3):
    hits = np.flatnonzero(free[b] == stop)
    n = int(hits[0]) + 1 if hits.size else M
    assert counts[b] == n, f"row {b}"
    np.testing.assert_array_equal(out[b, :n], free[b, :n])  # other rows are unaffected by row 0 stopping
    assert (out[b, n:] == pad).all()
  assert counts[0] == 4 and out[0, 3] == stop
  # A finished row stops growing its cache, so rows never write past their own budget.
  np.testing.assert_array_equal(np.asarray(state.cache.lengths), lengths + counts - 1)


def test_max_new_tokens_one_is_prefill_only(params, cfg):
  tokens, lengths = _prompts([4, 8], T=8)
  state = _generate(params, cfg, tokens, lengths, max_new=1)
  assert np.asarray(state.counts).tolist() == [1, 1] and int(state.steps) == 0
  assert int(state.tokens[1, 0]) == _reference(params, cfg, tokens[1], 1)[0]


def test_one_compile_across_prompts_within_a_bucket(params, cfg):
  gen = engine.VanillaGenerator(params, cfg, sampling_cfg=GREEDY, max_new_tokens=M, stop_ids=(3,))
  for seed, lengths in enumerate([[3, 9], [16, 1], [11, 12], [5, 5], [2, 15]]):
    tokens, lengths = _prompts(lengths, T=16, seed=seed)
    out = gen.generate(engine.Batch(tokens=tokens, lengths=lengths, n_real=2))
    assert out.tokens.shape == (2, M) and (out.counts >= 1).all()
  assert gen.compile_count == 1
  tokens, lengths = _prompts([20], T=32)
  gen.generate(engine.Batch(tokens=tokens, lengths=lengths, n_real=1))
  assert gen.compile_count == 2  # a new bucket is a new shape: exactly one more compile


def test_engine_check_catches_retracing(params, cfg):
  class Retracing(engine.VanillaGenerator):
    def generate(self, batch):
      # A static argument that changes per call (here the pad id) is the classic retrace bug.
      self._static = self._static | {"pad_id": self._static["pad_id"] + 1}
      self._compiled.clear()
      return super().generate(batch)

  class Tok:
    chat_template = None
    def encode(self, text):
      return [ord(c) % 128 for c in text]
    def decode(self, ids, skip_special_tokens=True):
      return "".join(chr(i) for i in ids)

  gen = Retracing(params, cfg, sampling_cfg=GREEDY, max_new_tokens=3)
  eng = engine.Engine(gen, Tok(), batch_size=1)
  with pytest.raises(RuntimeError, match="retraces"):
    eng.run([{"prompt": "ab"}, {"prompt": "cd"}], progress=False, max_compiles=1)


@pytest.mark.parametrize("lengths, T, max_new, cache_extra, match", [
    ([0, 3], 8, 4, 0, "empty prompt in rows \\[0\\]"),
    ([9], 8, 4, 0, "exceed the padded prompt length"),
    ([4], 8, 4, -1, "exceeds the KV cache length"),
    ([60], 64, 8, 0, "exceeds max_position_embeddings=64"),
    ([4], 8, 0, 0, "max_new_tokens must be >= 1"),
])
def test_bad_inputs_raise(cfg, lengths, T, max_new, cache_extra, match):
  tokens = np.ones((len(lengths), T), np.int32)
  with pytest.raises(ValueError, match=match):
    vanilla.validate(tokens, np.asarray(lengths), target=protocol.llama_target(cfg),
                     cache_len=T + max_new + cache_extra, max_new_tokens=max_new)


def test_bad_token_ids_and_generator_raise(params, cfg):
  with pytest.raises(ValueError, match="token ids must lie in"):
    vanilla.validate(np.full((1, 4), 128), np.asarray([2]), target=protocol.llama_target(cfg), cache_len=8,
                     max_new_tokens=2)
  gen = engine.VanillaGenerator(params, cfg, sampling_cfg=GREEDY, max_new_tokens=60)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    gen.generate(engine.Batch(tokens=np.ones((1, 8), np.int32), lengths=np.asarray([8], np.int32), n_real=1))
  assert gen.compile_count == 0  # rejected before anything is traced


def test_bucket_length():
  assert [engine.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 48, 49, 64, 65, 97, 150, 200)] == [
      16, 16, 24, 24, 32, 48, 48, 64, 64, 96, 128, 192, 256]
  with pytest.raises(ValueError):
    engine.bucket_length(0)

