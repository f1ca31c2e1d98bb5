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
  prompts = _prompts(240, seed=2, high=30)  # buckets 16, 24, 32: caches of 24, 32 and 48 slots
  b = _batcher(params, cfg, slots=4, max_new_tokens=3, sync_every=2, admit_group=4, admit_order="shortest")
  out, stats = b.run(prompts)
  assert stats["admissions"] == 240 and stats["grows"] >= 1 and all(len(o) == 3 for o in out)
  sizes = {S for kind, S, _ in b._compiled if kind == "steps"}
  assert sizes <= {24, 32, 48} and max(sizes) == 48
  # Executables: an admission per (cache size, bucket, group size K in 1, 2, 4), a step loop per size, resizes
  # between sizes: all made in the first run, none after.
  first = b.compile_count
  assert first == len(b._compiled) <= len(sizes) * 3 * 3 + len(sizes) + len(sizes) ** 2
  b.run(prompts)
  assert b.compile_count == first  # the same requests again: every executable warm, no trace at all
  again, _ = b.run(prompts[:50])  # another schedule may meet a new pair of sizes, and compiles it once
  assert again == out[:50] and b.compile_count == len(b._compiled)


def test_the_cache_follows_the_rows_lengths(params, cfg):
  """A short prompt with a long answer: the cache starts near the prompt and grows as tokens are emitted (each
  chunk's need: prompt bucket + tokens so far + a chunk), then is cut once the long answers are done; tokens exact."""
  prompts = _prompts(2, seed=6, low=2, high=5) + _prompts(3, seed=7, low=2, high=5)
  b = _batcher(params, cfg, slots=2, sync_every=2, max_new_tokens=26, admit_order="shortest")
  out, stats = b.run(prompts)
  assert out == [_reference(params, cfg, p, 26) for p in prompts]
  sizes = sorted({S for kind, S, _ in b._compiled if kind == "steps"})
  assert sizes == [batching.cache_size(16 + 1 + 2), 32, batching.cache_size(16 + 26)] == [24, 32, 48]
  assert stats["grows"] >= 2 and stats["shrinks"] >= 1, stats


def test_the_slot_model_replays_the_batchers_cache_sizes(params, cfg, monkeypatch):
  """autotree.continuous_seconds follows the batcher's schedule: with each step priced at its cache size and
  admissions free, its seconds equal the sum over the batcher's own chunks of steps x cache slots (no stop token:
  every request runs M - 1 steps after its prefill)."""
  import types

  from eagle3_jax.decode import autotree

  chunks, call = [], batching.ContinuousBatcher._call

  def logged(self, kind, S, T, stats, *args, **kw):
    out = call(self, kind, S, T, stats, *args, **kw)
    if kind == "steps":
      chunks.append((S, int(out.steps)))
    return out

  monkeypatch.setattr(batching.ContinuousBatcher, "_call", logged)
  for order in batching.ADMIT_ORDERS:
    prompts = _prompts(7, seed=9, low=2, high=30)
    chunks.clear()
    b = _batcher(params, cfg, slots=3, sync_every=4, admit_order=order)
    out, _ = b.run(prompts)
    assert all(len(o) == M for o in out)
    work, before = 0, 0
    for S, steps in chunks:
      work, before = work + (steps - before) * S, steps
    assert len({S for S, _ in chunks}) >= 2  # the sizes move, so the comparison means something
    model = autotree.continuous_seconds(
        types.SimpleNamespace(admit_s=lambda T, speculative=False: 0.0), [b.bucket_fn(len(p)) for p in prompts], M - 1,
        slots=3, final_len=lambda T: batching.final_len(T, M), max_new_tokens=M, growth=4, per_round=float,
        sync_every=4, admit_order=order)
    assert model == work, (order, chunks)


def test_growing_mid_answer_keeps_running_rows_exact(params, cfg):
  """Short prompts are mid-answer when a long one needs a bigger cache: their tokens are still those alone."""
  prompts = _prompts(5, seed=4, low=2, high=6) + _prompts(2, seed=5, low=17, high=22)  # caches 32, 64
  out, stats = _batcher(params, cfg, slots=4, sync_every=2, admit_order="shortest").run(prompts)
  assert stats["grows"] >= 1
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
  assert stats["shrinks"] >= 1
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
