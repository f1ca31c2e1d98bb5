"""Training: the loss falls and acc_0 rises on the tiny dataset; lr schedules; gradient accumulation, bf16 compute."""

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eagle3_jax import interop, sharding
from eagle3_jax.train import step as step_lib, loop
from eagle3_jax.train import setup as run_setup
from eagle3_jax.train.checkpoint import Checkpointer
from eagle3_jax.config import load_config
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.config import OptimConfig


def _create_state(key, mesh, draft_cfg, tx):
  """A fresh state, created directly in its shardings (never whole on one device)."""
  init = functools.partial(step_lib.init_state, draft_cfg=draft_cfg, tx=tx)
  return jax.jit(init, out_shardings=step_lib.state_shardings(mesh, draft_cfg, tx))(key)

TINY = pathlib.Path(__file__).parent.parent / "configs" / "tiny.py"


def _metrics(run_dir, split="train"):
  rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["split"] == split]


def test_tiny_run_learns_and_exports(tmp_path):
  """150 steps on configs/tiny.py: per-token cross-entropy falls, acc_0 rises, the draft is exported in the
  official layout (what was trained is what read_draft returns), and the summary has the promised fields."""
  cfg = load_config(TINY, [f"run_dir={tmp_path}", "num_steps=150", "log_every=1", "eval_every=0", "progress=false",
                           "checkpoint_every=1000"])
  summary = loop.train(cfg)
  for key in ("step", "loss", "acc_0", "tokens_per_s", "checkpoint_dir"):
    assert summary[key] is not None, key
  assert summary["step"] == 150 and summary["tokens_per_s"] > 0
  rows = _metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 151))
  first, last = rows[:15], rows[-15:]
  ce = lambda rs: np.mean([r["ce_j"][0] for r in rs])  # noqa: E731
  acc = lambda rs: np.mean([r["acc_j"][0] for r in rs])  # noqa: E731
  assert ce(last) < ce(first) - 0.08, (ce(first), ce(last))
  assert acc(last) > acc(first) + 0.2, (acc(first), acc(last))
  # The end-of-run eval on the held-out split sees the same improvement, and a simulated tau > 1.
  assert summary["eval"]["acc_j"][0] > 0.3 and summary["eval"]["tau"] > 1.3

  exported = interop.read_draft(summary["export_dir"])
  ckpt = Checkpointer(summary["checkpoint_dir"])
  steps = ckpt.all_steps()
  assert steps == [150]
  target_cfg = cfg.target.random
  statics = step_lib.StepStatics.of(cfg, target_cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  tx = step_lib.make_optimizer(cfg.optim, cfg.num_steps)
  state = ckpt.restore(150, step_lib.abstract_state(mesh, statics.draft_cfg, tx), None)
  ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0),
               jax.device_get(state.params), exported.params)
  assert exported.cfg == statics.draft_cfg
  assert exported.aux_layer_ids == tuple(target_cfg.aux_layer_ids)
  # The draft vocabulary stored in the run dir is the exported one.
  from eagle3_jax.draft import vocab

  vm = vocab.load_vocab(pathlib.Path(summary["run_dir"]) / "draft_vocab.safetensors")
  np.testing.assert_array_equal(np.asarray(exported.vocab.d2t), vm.d2t)


def test_two_layer_qwen3_style_windowed_draft_trains_and_exports_in_the_speculators_layout(tmp_path):
  """draft.qk_norm + draft.sliding_window + draft.num_layers: two Qwen3-style windowed draft layers train (ce_0
  falls); the official layout cannot express them, so the export is a speculators directory (with the target's
  embedding) that reads back as the same draft."""
  cfg = load_config(TINY, [f"run_dir={tmp_path}", "num_steps=30", "log_every=1", "eval_every=0", "progress=false",
                           "checkpoint_every=1000", "draft.qk_norm=true", "draft.sliding_window=8",
                           "draft.num_layers=2"])
  summary = loop.train(cfg)
  rows = _metrics(tmp_path)
  assert np.mean([r["ce_j"][0] for r in rows[-5:]]) < np.mean([r["ce_j"][0] for r in rows[:5]])
  exported = interop.read_draft(summary["export_dir"])
  assert exported.cfg.qk_norm and exported.source_layout == "speculators" and exported.embed is not None
  assert exported.cfg.sliding_window == 8 and exported.cfg.num_layers == 2 and "1" in exported.params["layers"]
  assert set(exported.params["midlayer"]["self_attn"]) >= {"q_norm", "k_norm"}
  config = json.loads((pathlib.Path(summary["export_dir"]) / "config.json").read_text())
  assert config["transformer_layer_config"]["model_type"] == "qwen3"


def test_eagle31_variant_trains_and_exports_its_flags(tmp_path):
  """draft.fc_norm / draft.norm_output select EAGLE 3.1: the head trains (ce_0 falls) and the export records it."""
  cfg = load_config(TINY, [f"run_dir={tmp_path}", "num_steps=40", "log_every=1", "eval_every=0", "progress=false",
                           "checkpoint_every=1000", "draft.fc_norm=true", "draft.norm_output=true"])
  summary = loop.train(cfg)
  rows = _metrics(tmp_path)
  assert np.mean([r["ce_j"][0] for r in rows[-5:]]) < np.mean([r["ce_j"][0] for r in rows[:5]])
  exported = interop.read_draft(summary["export_dir"])
  assert exported.cfg.fc_norm and exported.cfg.norm_output and not exported.cfg.norm_before_fc
  assert set(exported.params["fc_norm"]) == {"0", "1", "2"}
  config = json.loads((pathlib.Path(summary["export_dir"]) / "config.json").read_text())
  assert config["fc_norm"] is True and config["norm_output"] is True
  assert config["eagle3_jax"]["norm_output"] == interop.formats.NORM_OUTPUT_FED_BACK


def test_time_limit_stops_on_time_then_evaluates_and_exports(tmp_path):
  """time_limit_s (a lease of fixed length): the run stops well before num_steps, as a stop and not as a signal,
  and still checkpoints the step it reached, evaluates and exports the draft."""
  cfg = load_config(TINY, [f"run_dir={tmp_path}", "num_steps=1000000", "time_limit_s=8", "log_every=1",
                           "eval_every=0", "progress=false", "checkpoint_every=1000000"])
  summary = loop.train(cfg)
  assert summary["timed_out"] and not summary["stopped_by_signal"]
  assert 0 < summary["step"] < 1000000
  assert summary["eval"] is not None and summary["eval"]["tau"] >= 1.0
  assert interop.read_draft(summary["export_dir"]).cfg == step_lib.StepStatics.of(cfg, cfg.target.random).draft_cfg
  ckpt = Checkpointer(summary["checkpoint_dir"])
  assert ckpt.all_steps() == [summary["step"]]
  ckpt.close()


@pytest.mark.parametrize("warmup, decay", [("linear", "linear"), ("log", "linear"), ("linear", "cosine"),
                                           ("linear", "constant")])
def test_lr_schedule(warmup, decay):
  o = OptimConfig(lr=1e-3, warmup_steps=10, warmup=warmup, decay=decay, end_lr_ratio=0.1)
  f = step_lib.lr_schedule(o, 110)
  lrs = np.asarray([float(f(s)) for s in range(0, 111)])
  assert 0 < lrs[0] < 1e-3 / 2 and np.all(np.diff(lrs[:10]) > 0)  # first step already moves, then warms up
  assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
  if warmup == "log":  # DeepSpeed WarmupDecayLR "log": lr·ln(step+1)/ln(warmup), shifted by one step here
    assert lrs[3] == pytest.approx(1e-3 * np.log(5) / np.log(11), rel=1e-5)
  if decay == "constant":
    assert np.allclose(lrs[10:], 1e-3)
  else:
    assert lrs[110] == pytest.approx(1e-4, rel=1e-4) and np.all(np.diff(lrs[10:]) <= 1e-12)
  if decay == "cosine":
    assert lrs[60] == pytest.approx(0.55e-3, rel=1e-4)


def _random_batch(B, T, V, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(T // 2, T + 1, (B,)).astype(np.int32)
  valid = np.arange(T)[None, :] < lengths[:, None]
  tokens = np.where(valid, rng.integers(0, V, (B, T)), 0).astype(np.int32)
  loss_mask = (valid & (rng.random((B, T)) < 0.7)).astype(np.int32)
  return {"tokens": tokens, "loss_mask": loss_mask, "lengths": lengths}


class _Setup:
  """One device, the tiny config at T=32, SGD (linear in the gradient, so parameters compare gradients)."""

  def __init__(self):
    self.mesh = sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
    self.cfg = load_config(TINY, ["data.max_length=32"])
    self.vocab = DraftVocab.from_ids(np.arange(0, 128, 2), 128)
    self.batch = _random_batch(8, 32, 128)
    self.tx = optax.sgd(0.5)
    target_cfg = self.cfg.target.random
    self.target = step_lib.random_target(jax.random.key(1), self.mesh, target_cfg, init_std=0.1)
    statics = step_lib.StepStatics.of(self.cfg, target_cfg)
    self.state0 = jax.device_get(_create_state(jax.random.key(0), self.mesh, statics.draft_cfg, self.tx))
    self.step, self.full, self.m_full = self.run(self.cfg)

  def run(self, cfg, n=1):
    """(jitted step, state after n steps, last metrics) starting from the shared initial state."""
    statics = step_lib.StepStatics.of(cfg, cfg.target.random)
    state_sh = step_lib.state_shardings(self.mesh, statics.draft_cfg, self.tx)
    step = step_lib.jit_train_step(statics, self.tx, self.mesh, state_sh,
                                    step_lib.target_shardings(self.mesh, cfg.target.random, jnp.float32),
                                    {k: sharding.named_sharding(self.mesh, step_lib.BATCH_AXES[k], np.shape(v))
                                     for k, v in self.batch.items()})
    state = jax.device_put(self.state0, state_sh)  # a fresh copy: the step donates it
    batch = step_lib.global_batch(self.mesh, self.batch)
    out = []
    for _ in range(n):
      state, m = step(state, self.target, self.vocab, batch, step_lib.stop_flags(self.mesh, 8, False))
      out.append((jax.device_get(state), jax.device_get(m)))
    return step, *out[0]


@pytest.fixture(scope="module")
def setup():
  return _Setup()


def test_grad_accumulation_equals_one_big_batch_and_compiles_once(setup):
  cfg = dataclasses.replace(setup.cfg, optim=dataclasses.replace(setup.cfg.optim, grad_accum=4))
  step, accum, m_acc = setup.run(cfg, n=3)
  assert step._cache_size() == 1  # three calls, one compilation
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), setup.full.params,
               accum.params)
  np.testing.assert_allclose(setup.m_full["loss"], m_acc["loss"], rtol=1e-5)
  np.testing.assert_allclose(setup.m_full["acc_j"], m_acc["acc_j"], rtol=1e-6)
  assert int(accum.step) == 1 and int(m_acc["tokens"]) == int(setup.batch["lengths"].sum())
  assert not np.allclose(setup.full.params["fc"], setup.state0.params["fc"])  # the step did move the weights


def test_bf16_compute_keeps_fp32_master_weights(setup):
  _, s16, m16 = setup.run(dataclasses.replace(setup.cfg, compute_dtype="bfloat16"))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(s16.params))
  assert np.isfinite(m16["loss"]) and np.isfinite(m16["grad_norm"])
  np.testing.assert_allclose(m16["loss"], setup.m_full["loss"], rtol=2e-2)
  # bf16 gradients point the same way as fp32 ones.
  d16 = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(s16.params),
                                                         jax.tree.leaves(setup.state0.params))])
  d32 = np.concatenate([(a - b).ravel() for a, b in zip(jax.tree.leaves(setup.full.params),
                                                         jax.tree.leaves(setup.state0.params))])
  assert d16 @ d32 / np.linalg.norm(d16) / np.linalg.norm(d32) > 0.98


def test_offline_features_run(tmp_path):
  """features=offline trains from a store that eagle3_jax.train.features dumped for the same target and data."""
  from eagle3_jax.train import data, features

  cfg = load_config(TINY, [f"run_dir={tmp_path / 'run'}", "data.max_length=48", "data.overflow=truncate",
                           "data.num_epochs=1", "num_steps=4", "eval_every=0", "export=false", "progress=false",
                           "log_every=1"])
  mesh = sharding.make_mesh(cfg.mesh)
  target_cfg, target = run_setup.load_target(cfg, mesh)
  tokenizer = run_setup.load_tokenizer(cfg)
  store = tmp_path / "features"
  index = features.dump_features(store, data.make_iterator(cfg.data, tokenizer, shard_index=0, shard_count=1),
                                 jax.device_get(target), target_cfg=target_cfg, target_name="tiny-random",
                                 dataset=json.dumps(data.dataset_fingerprint(cfg.data), sort_keys=True),
                                 dtype="float32")
  assert index["num_examples"] > 32
  offline = dataclasses.replace(cfg, features="offline", feature_dir=str(store))
  summary = loop.train(offline)
  assert summary["step"] == 4 and np.isfinite(summary["loss"])
  with pytest.raises(ValueError, match="max_length"):
    loop.train(dataclasses.replace(offline, data=dataclasses.replace(cfg.data, max_length=64),
                                         run_dir=str(tmp_path / "other")))
