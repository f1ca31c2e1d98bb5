"""Decode executables on XLA:CPU (decode/xla_cpu.py): the [D, V] head layout gives the same logits, both settings
give the same tokens, the setting reaches the compiled executable, and a bad setting is a clear error."""

import dataclasses

import jax
import numpy as np
import pytest

from eagle3_jax.decode import engine, sampling, xla_cpu
from eagle3_jax.target import llama, protocol


@pytest.fixture
def tied(tiny_cfg):
  cfg = dataclasses.replace(tiny_cfg, num_layers=2, max_position_embeddings=64, tie_word_embeddings=True)
  params = llama.init_params(cfg, jax.random.key(0))
  assert "lm_head" not in params
  return cfg, jax.tree.map(lambda x: x * 20.0 if x.ndim > 1 else x, params)


def test_decode_layout_adds_a_transposed_head_with_the_same_logits(tied):
  cfg, params = tied
  laid = jax.jit(lambda p: llama.decode_layout(p, cfg=cfg))(params)
  np.testing.assert_array_equal(laid["lm_head"], np.asarray(params["embed"]).T)
  hidden = jax.random.normal(jax.random.key(1), (2, 3, cfg.hidden_size))
  np.testing.assert_allclose(llama.lm_head(laid, hidden, cfg=cfg), llama.lm_head(params, hidden, cfg=cfg),
                             rtol=1e-5, atol=1e-5)
  untied = dict(params, lm_head=params["embed"].T)
  assert llama.decode_layout(untied, cfg=cfg) is untied  # an untied head is already [D, V]
  assert llama.decode_layout(laid, cfg=cfg) is laid  # laid-out params come back as they are (slot batchers)


@pytest.mark.parametrize("untie", [False, True])
def test_decode_layout_for_8_to_16_rows_puts_the_head_in_column_blocks(tied, untie):
  cfg, params = tied
  if untie:
    params = dict(params, lm_head=params["embed"].T * 0.5)
  V = cfg.vocab_size
  assert V % llama.HEAD_CHUNK != 0  # the tiny vocabulary exercises the padded last block
  laid = jax.jit(lambda p: llama.decode_layout(p, cfg=cfg, rows=8))(params)
  C = -(-V // llama.HEAD_CHUNK)
  assert laid["lm_head_chunks"].shape == (C, cfg.hidden_size, llama.HEAD_CHUNK)
  hidden = jax.random.normal(jax.random.key(1), (4, 2, cfg.hidden_size))
  got = llama.lm_head(laid, hidden, cfg=cfg)
  assert got.shape == (4, 2, V)
  np.testing.assert_allclose(got, llama.lm_head(params, hidden, cfg=cfg), rtol=1e-5, atol=1e-4)
  assert llama.decode_layout(laid, cfg=cfg, rows=8) is laid
  for rows in (1, 4, 17):  # outside 8..16 the whole [D, V] copy (or an untied head as it is)
    assert "lm_head_chunks" not in jax.eval_shape(lambda p, r=rows: llama.decode_layout(p, cfg=cfg, rows=r), params)


def _run(cfg, params, monkeypatch, mode, *, slots=None, rows=2):
  monkeypatch.setenv(xla_cpu.ENV, mode)
  gen = engine.make_generator(params, cfg, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=8, slots=slots)
  rng = np.random.default_rng(0)
  lengths = np.array([5, 11] * (rows // 2), np.int32)
  tokens = np.zeros((len(lengths), 16), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, :n] = rng.integers(0, cfg.vocab_size, n)
  if slots is None:
    out = gen.generate(engine.Batch(tokens=tokens, lengths=lengths, n_real=len(lengths)))
    return [list(out.tokens[b, :out.counts[b]]) for b in range(len(lengths))], gen
  ids, _ = gen.run([list(tokens[b, :n]) for b, n in enumerate(lengths)])
  return ids, gen


@pytest.mark.parametrize("slots,rows", [(None, 2), (2, 2), (None, 8)])  # 8 rows: the head in column blocks
def test_both_settings_decode_the_same_tokens(tied, monkeypatch, slots, rows):
  cfg, params = tied
  few_rows, _ = _run(cfg, params, monkeypatch, "xla", slots=slots, rows=rows)
  default, _ = _run(cfg, params, monkeypatch, "ynn", slots=slots, rows=rows)
  assert few_rows == default


@pytest.mark.parametrize("slots", [2, 8])
def test_slot_batchers_lay_the_head_out_once_not_per_chunk(tied, monkeypatch, slots):
  """The batcher keeps its params in the decode layout, so its step loop's executable takes the laid-out head as an
  input and makes no copy of the embedding (it did at every 16-step chunk); admissions read the params as given."""
  cfg, params = tied
  monkeypatch.setenv(xla_cpu.ENV, "xla")
  jax.clear_caches()  # traces are cached without the setting: an earlier "ynn" test's trace has no layout in it
  b = engine.make_generator(params, cfg, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=8, slots=slots)
  prompts = [[1, 2, 3], [4, 5]]
  b.run(prompts)
  laid = b._step_params()
  assert ("lm_head_chunks" if slots >= 8 else "lm_head") in laid and b._params is params
  assert laid["embed"] is params["embed"] and b._step_params() is laid  # made once; only its own arrays are new
  temp = lambda: next(e for k, e in b._compiled.items() if k[0] == "steps").memory_analysis().temp_size_in_bytes
  kept = temp()
  b._laid, b._compiled = (lambda rows: params), {}  # as before: the step loop lays out the head at every call
  b.run(prompts)
  # The copy ([D, V] or its column blocks) is scratch of the loop's executable only when the loop makes it.
  assert temp() - kept >= cfg.hidden_size * cfg.vocab_size * 4, (temp(), kept)


@pytest.mark.parametrize("rows", [2, 8])
def test_static_generators_lay_the_head_out_once_per_batch_size(tied, monkeypatch, rows):
  """A static generator keeps one decode layout per batch size: its batches' executables take the laid-out head as
  an input (no copy inside, as there was at every batch), and a second batch makes no second layout."""
  cfg, params = tied
  monkeypatch.setenv(xla_cpu.ENV, "xla")
  jax.clear_caches()
  _, gen = _run(cfg, params, monkeypatch, "xla", rows=rows)
  laid = gen._laid(rows)
  assert ("lm_head_chunks" if rows >= 8 else "lm_head") in laid and laid["embed"] is params["embed"]
  tokens = np.ones((rows, 16), np.int32)
  gen.generate(engine.Batch(tokens=tokens, lengths=np.full((rows,), 3, np.int32), n_real=rows))
  assert gen._laid(rows) is laid  # the same arrays: made once
  temp = lambda: next(iter(gen._compiled.values())).memory_analysis().temp_size_in_bytes  # noqa: E731
  kept = temp()
  gen._laid, gen._compiled, gen._caches = (lambda r: params), {}, {}  # as before: laid out inside each call
  gen.generate(engine.Batch(tokens=tokens, lengths=np.full((rows,), 3, np.int32), n_real=rows))
  assert temp() - kept >= cfg.hidden_size * cfg.vocab_size * 4, (temp(), kept)


def test_the_setting_reaches_the_compiled_executable(tied, monkeypatch):
  cfg, params = tied
  assert jax.default_backend() == "cpu"
  monkeypatch.setenv(xla_cpu.ENV, "xla")
  assert xla_cpu.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
  assert xla_cpu.compiler_options(rows=1) is None  # plain decoding at batch 1 keeps XLA's defaults
  assert "lm_head" in jax.eval_shape(lambda p: xla_cpu.decode_params(protocol.llama_target(cfg), p, rows=2), params)
  _, gen = _run(cfg, params, monkeypatch, "xla")
  assert "ynn_fusion" not in next(iter(gen._compiled.values())).as_text()
  _, gen = _run(cfg, params, monkeypatch, "ynn")
  assert "ynn_fusion" in next(iter(gen._compiled.values())).as_text()  # XLA:CPU's default, so the check can fail
  assert xla_cpu.compiler_options() is None
  assert xla_cpu.decode_params(protocol.llama_target(cfg), params, rows=8) is params


def test_a_bad_setting_names_the_variable(monkeypatch):
  monkeypatch.setenv(xla_cpu.ENV, "fast")
  with pytest.raises(ValueError, match="EAGLE3_JAX_DECODE_DOTS"):
    xla_cpu.compiler_options()
