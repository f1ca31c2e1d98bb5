"""Two processes on this CPU (jax.distributed on localhost, 2 devices each) train a few steps and checkpoint."""

import json
import os
import pathlib
import socket
import subprocess
import sys

from eagle3_jax.train.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  common = ["--config", str(ROOT / "configs" / "tiny.py"), "distributed=true", f"coordinator_address=localhost:{port}",
            "num_processes=2", f"run_dir={tmp_path}", "num_steps=3", "data.batch_size=4", "data.max_length=48",
            "data.overflow=truncate", "data.eval_fraction=0", "log_every=1", "export=true", "progress=false", "mesh.data=2",
            "mesh.fsdp=2"]
  procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, f"process_id={i}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=300))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  summary = json.loads(outs[0][0].strip().splitlines()[-1])
  assert summary["step"] == 3 and summary["loss"] > 0
  # The global batch is both processes' rows: 4 + 4 sequences per step.
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [3]
  # One data-iterator state per process, both in the one checkpoint.
  assert sorted(os.listdir(tmp_path / "checkpoints" / "3" / "data_iter")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  assert (pathlib.Path(summary["export_dir"]) / "model.safetensors").exists()
