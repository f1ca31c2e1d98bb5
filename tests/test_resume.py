"""Resume is exact (parameters and data order), and SIGTERM saves a checkpoint that the next run resumes from."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from eagle3_jax import sharding
from eagle3_jax.train import step as step_lib, loop
from eagle3_jax.train import setup
from eagle3_jax.train.checkpoint import Checkpointer
from eagle3_jax.config import load_config

ROOT = pathlib.Path(__file__).parent.parent
TINY = ROOT / "configs" / "tiny.py"
COMMON = ["num_steps=8", "log_every=1", "eval_every=0", "export=false", "progress=false", "checkpoint_every=1000",
          "data.max_length=48", "data.overflow=truncate"]


def _final_params(cfg, run_dir):
  statics = step_lib.StepStatics.of(cfg, cfg.target.random)
  tx = step_lib.make_optimizer(cfg.optim, cfg.num_steps)
  ckpt = Checkpointer(pathlib.Path(run_dir) / "checkpoints")
  state = ckpt.restore(ckpt.latest_step(), step_lib.abstract_state(sharding.make_mesh(cfg.mesh),
                                                                     statics.draft_cfg, tx), None)
  ckpt.close()
  return jax.device_get(state)


def _train_rows(run_dir):
  rows = [json.loads(x) for x in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows if r["split"] == "train"}


def test_resume_is_exact(tmp_path):
  """8 steps straight == 4 steps, checkpoint, a new run restoring it, 4 more steps: bit-identical parameters and
  Adam state, and the same batches (per-step loss and token counts) after the restore."""
  straight, split = tmp_path / "straight", tmp_path / "split"
  cfg = load_config(TINY, COMMON + [f"run_dir={straight}"])
  a = loop.train(cfg)
  first = loop.train(load_config(TINY, COMMON + [f"run_dir={split}", "stop_after=4"]))
  assert first["step"] == 4 and first["export_dir"] is None
  b = loop.train(load_config(TINY, COMMON + [f"run_dir={split}"]))
  assert b["resumed_from"] == 4 and b["step"] == 8 == a["step"]
  sa, sb = _final_params(cfg, straight), _final_params(cfg, split)
  jax.tree.map(np.testing.assert_array_equal, sa, sb)
  ra, rb = _train_rows(straight), _train_rows(split)
  for step in range(1, 9):
    assert (ra[step]["loss"], ra[step]["ce_j"]) == (rb[step]["loss"], rb[step]["ce_j"]), step
  assert a["data"] == b["data"]  # the iterator's counters (rows read, tokens) were restored with it
  # The run's draft vocabulary is reused only for the data it was counted on.
  with pytest.raises(ValueError, match="another dataset"):
    loop.train(load_config(TINY, COMMON + [f"run_dir={split}", "data.max_rows=100", "num_steps=9"]))


def _run(args, **kw):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(TINY), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_saves_and_the_next_run_resumes(tmp_path):
  args = ["log_every=1", "eval_every=0", "export=false", "progress=false", "checkpoint_every=100000",
          f"run_dir={tmp_path}"]
  proc = _run(args + ["num_steps=100000"])
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["stopped_by_signal"] and summary["step"] >= 3
  stopped_at = summary["step"]
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [stopped_at]

  proc = _run(args + [f"num_steps={stopped_at + 2}"])
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  resumed = json.loads(out.strip().splitlines()[-1])
  assert resumed["resumed_from"] == stopped_at and resumed["step"] == stopped_at + 2
  assert not resumed["stopped_by_signal"]


def test_checkpointer_keeps_n_and_restores_the_iterator_position(tmp_path):
  cfg = load_config(TINY, ["data.max_length=48", "data.overflow=truncate"])
  tokenizer = setup.char_tokenizer()
  from eagle3_jax.train import data

  it = data.make_iterator(cfg.data, tokenizer, shard_index=0, shard_count=1)
  state = {"w": jax.numpy.arange(6.0).reshape(2, 3), "step": jax.numpy.zeros((), jax.numpy.int32)}
  ckpt = Checkpointer(tmp_path, keep=2)
  after = {}
  for step in range(1, 5):
    next(it)
    ckpt.save(step, jax.tree.map(lambda x: x + step, state), it)
    after[step] = next(it)  # drawn after the save: what a restore of this step must yield next
  ckpt.close()
  reader = Checkpointer(tmp_path, keep=2)
  assert reader.all_steps() == [3, 4]  # keep=2: older steps are deleted
  fresh = data.make_iterator(cfg.data, tokenizer, shard_index=0, shard_count=1)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = reader.restore(3, abstract, fresh)
  np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 3)
  # The iterator resumes where it was when step 3 was saved (the batch drawn right after that save).
  np.testing.assert_array_equal(next(fresh)["tokens"], after[3]["tokens"])
  reader.close()


def test_offline_resume_is_exact_and_dumps_the_store_itself(tmp_path):
  """features=offline with a feature_dir that does not exist yet: the run dumps the store (length-bucketed) and
  trains from length-bucketed batches; 8 steps straight == 4 + 4 across a restore, bit for bit."""
  store = tmp_path / "features"
  common = COMMON + [f"feature_dir={store}", "features=offline", "feature_dtype=float32", "ttt.loss_norm=tokens",
                     "data.max_length=80", "data.batch_size=4"]
  common = [c for c in common if c != "data.max_length=48"]
  cfg = load_config(TINY, common + [f"run_dir={tmp_path / 'straight'}"])
  a = loop.train(cfg)
  index = json.loads((store / "index.json").read_text())
  assert index["complete"] and index["seq_len"] == 80 and index["num_examples"] > 300
  loop.train(load_config(TINY, common + [f"run_dir={tmp_path / 'split'}", "stop_after=4"]))
  b = loop.train(load_config(TINY, common + [f"run_dir={tmp_path / 'split'}"]))
  assert b["resumed_from"] == 4 and a["step"] == b["step"] == 8
  jax.tree.map(np.testing.assert_array_equal, _final_params(cfg, tmp_path / "straight"),
               _final_params(cfg, tmp_path / "split"))
  ra, rb = _train_rows(tmp_path / "straight"), _train_rows(tmp_path / "split")
  assert [ra[s]["loss"] for s in range(1, 9)] == [rb[s]["loss"] for s in range(1, 9)]
  with pytest.raises(ValueError, match="dumped from other data"):
    loop.train(load_config(TINY, common + [f"run_dir={tmp_path / 'other'}", "data.max_rows=200"]))
  from eagle3_jax.train import features

  it = features.BucketedBatches(features.FeatureStore(store), 4, seed=cfg.data.seed)
  assert len({next(it)["tokens"].shape[1] for _ in range(8)}) > 1  # the 8 steps saw batches of several lengths


def test_init_from_starts_from_an_exported_draft(tmp_path):
  """init_from: a new run starts with the exported weights and vocabulary (its step-0 eval equals the export's
  eval), a draft of another shape is refused by name, and a resumed run ignores init_from."""
  first = loop.train(load_config(TINY, COMMON + [f"run_dir={tmp_path / 'a'}", "export=true"]))
  export = first["export_dir"]
  warm = load_config(TINY, COMMON + [f"run_dir={tmp_path / 'b'}", f"init_from={export}", "num_steps=1",
                                     "optim.lr=1e-12", "optim.warmup_steps=0", "export=true"])
  b = loop.train(warm)
  from eagle3_jax import interop

  ea, eb = interop.read_draft(export), interop.read_draft(b["export_dir"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ea.params, eb.params)
  np.testing.assert_array_equal(np.asarray(ea.vocab.d2t), np.asarray(eb.vocab.d2t))
  with pytest.raises(ValueError, match="another shape .*draft_vocab_size"):
    loop.train(load_config(TINY, COMMON + [f"run_dir={tmp_path / 'c'}", f"init_from={export}",
                                                 "draft.draft_vocab_size=32"]))


def test_ttt_curriculum_phases_and_resume_across_them(tmp_path):
  """ttt.schedule=0:1,4:3: steps 1-4 train one TTT step, steps 5-8 three; eval stays 3 deep; a run stopped at
  step 2 and resumed equals the straight run bit for bit (the phase is a function of the restored step)."""
  sched = COMMON + ["ttt.schedule=0:1,4:3"]
  cfg = load_config(TINY, sched + [f"run_dir={tmp_path / 'straight'}"])
  assert [cfg.ttt.steps_at(s) for s in range(8)] == [1, 1, 1, 1, 3, 3, 3, 3]
  a = loop.train(cfg)
  rows = _train_rows(tmp_path / "straight")
  assert [len(rows[s]["acc_j"]) for s in range(1, 9)] == [1] * 4 + [3] * 4
  loop.train(load_config(TINY, sched + [f"run_dir={tmp_path / 'split'}", "stop_after=2"]))
  b = loop.train(load_config(TINY, sched + [f"run_dir={tmp_path / 'split'}"]))
  assert a["step"] == b["step"] == 8
  jax.tree.map(np.testing.assert_array_equal, _final_params(cfg, tmp_path / "straight"),
               _final_params(cfg, tmp_path / "split"))
  for bad in ("1:1", "0:1,0:3", "0:4", "0-1"):
    with pytest.raises(ValueError, match="schedule"):
      load_config(TINY, [f"ttt.schedule={bad}"])
