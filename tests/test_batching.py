"""Continuous batching: every request decodes exactly as it would alone (greedy and sampled, whatever its slot and
neighbours), pools by cache length, and admissions never recompile."""

import jax
import numpy as np
import pytest

from eagle3_jax.decode import batching, sampling
from eagle3_jax.target import protocol
from test_decode import M, _reference, cfg, params  # noqa: F401  (cfg, params: test_decode's fixtures)


def _prompts(n, seed, low=1, high=20, V=128):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, V, int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


def _batcher(params, cfg, **kw):
  kw = dict(slots=3, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=M, sync_every=4) | kw
  return batching.ContinuousBatcher(params, protocol.llama_target(cfg), **kw)


def _cut(ids, stop_ids):
  for j, t in enumerate(ids):
    if t in stop_ids:
      return ids[:j + 1]
  return ids


@pytest.mark.parametrize("admit_group", [1, 4])
def test_greedy_requests_decode_as_alone(params, cfg, admit_group):
  prompts = _prompts(11, seed=0)
  alone = [_reference(params, cfg, p, M) for p in prompts]
  stop = alone[3][4]  # a token some row emits mid-answer: that row stops early, its slot is refilled
  out, stats = _batcher(params, cfg, stop_ids=(stop,), admit_group=admit_group).run(prompts)
  assert out == [_cut(a, {stop}) for a in alone]
  assert any(len(o) < M for o in out) and stats["admissions"] == len(prompts)
  assert 0 < stats["utilisation"] <= 1 and stats["tokens"] == sum(map(len, out))


def test_sampled_requests_keep_their_own_key(params, cfg):
  """At T > 0 request i samples with fold_in(seed, i), split once per token, wherever it runs: the same tokens as
  the no-cache reference with that key, with 1 slot or 4, so the sampling invariants of plain decoding carry over."""
  hot = sampling.SamplingConfig(temperature=1.0)
  prompts = _prompts(7, seed=1)
  many, _ = _batcher(params, cfg, slots=4, sampling_cfg=hot, seed=5, admit_group=3).run(prompts)
  one, _ = _batcher(params, cfg, slots=1, sampling_cfg=hot, seed=5, sync_every=3).run(prompts)
  ref = [_reference(params, cfg, p, M, key=jax.random.fold_in(jax.random.key(5), i), sampling_cfg=hot)
         for i, p in enumerate(prompts)]
  assert many == one == ref
  assert len({tuple(r) for r in ref}) == len(ref)


def test_cache_grows_with_the_prompts_and_nothing_recompiles_over_hundreds_of_admissions(params, cfg):
  prompts = _prompts(240, seed=2, high=30)  # buckets 16, 24, 32 -> caches of 32 then 64 slots
  b = _batcher(params, cfg, slots=4, max_new_tokens=3, sync_every=2, admit_group=4, admit_order="shortest")
  out, stats = b.run(prompts)
  assert stats["admissions"] == 240 and stats["grows"] == 1 and all(len(o) == 3 for o in out)
  sizes = {batching.pool_cache_len(b.bucket_fn(len(p)), 3) for p in prompts}
  assert sizes == {32, 64}
  # Executables: an admission per (cache size, bucket, group size K in 1, 2, 4), a step loop per size, one grow.
  assert b.compile_count == len(b._compiled) <= 3 * 3 + len(sizes) + 1
  again, _ = b.run(prompts[:50])
  assert again == out[:50] and b.compile_count == len(b._compiled)  # warm shapes: no trace at all
  b.run(prompts)
  assert b.compile_count == len(b._compiled) <= 3 * 3 + len(sizes) + 1


def test_growing_mid_answer_keeps_running_rows_exact(params, cfg):
  """Short prompts are mid-answer when a long one needs a bigger cache: their tokens are still those alone."""
  prompts = _prompts(5, seed=4, low=2, high=6) + _prompts(2, seed=5, low=17, high=22)  # caches 32, 64
  out, stats = _batcher(params, cfg, slots=4, sync_every=2, admit_order="shortest").run(prompts)
  assert stats["grows"] == 1
  assert out == [_reference(params, cfg, p, M) for p in prompts]


def test_longest_first_shrinks_the_cache_under_running_rows(params, cfg):
  """Longest prompt first (the default): the cache starts at 64 slots and is cut to 32 once the long request is done, while
  shorter requests are mid-answer; every request still decodes as alone, and the short/long order is unchanged."""
  long = _prompts(1, seed=5, low=17, high=22)  # cache 64
  short = _prompts(6, seed=4, low=2, high=6)  # cache 32
  prompts = short[:3] + long + short[3:]
  alone = [_reference(params, cfg, p, M) for p in prompts]
  stop = alone[3][1]  # the long request stops after two tokens ...
  first_stop = [next((j for j, t in enumerate(a) if t == stop), M) for a in alone]
  assert all(first_stop[i] > 4 for i in (0, 1, 2, 4, 5, 6)), first_stop  # ... while the short ones run on
  b = _batcher(params, cfg, slots=3, sync_every=2, stop_ids=(stop,))
  assert b.admit_order == batching.DEFAULT_ADMIT_ORDER == "longest"
  out, stats = b.run(prompts)
  assert stats["shrinks"] == 1 and stats["grows"] == 0
  assert out == [_cut(a, {stop}) for a in alone]
  again, _ = _batcher(params, cfg, slots=3, sync_every=2, stop_ids=(stop,), admit_order="shortest").run(prompts)
  assert again == out


def test_bad_input_raises(params, cfg):
  with pytest.raises(ValueError, match="empty prompt"):
    _batcher(params, cfg).run([[1, 2], []])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    _batcher(params, cfg).run([list(range(60))])
  with pytest.raises(ValueError, match="slots"):
    _batcher(params, cfg, slots=0)
  with pytest.raises(ValueError, match="admit_group"):
    _batcher(params, cfg, admit_group=0)
  with pytest.raises(ValueError, match="admit_order"):
    _batcher(params, cfg, admit_order="random")
