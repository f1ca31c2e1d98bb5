"""The training run: automatic resume, the step loop with SIGTERM-safe checkpoints, progress bar and TensorBoard
scalars, held-out eval and draft export (what a run starts from is in setup.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eagle3_jax import sharding
from eagle3_jax.config import TrainConfig
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.train import checkpoint, data, setup
from eagle3_jax.train import step as step_lib

log = logging.getLogger(__name__)
_STOP = threading.Event()  # set by SIGTERM / SIGINT; the loop saves and exits at the next step boundary


def _on_signal(signum, frame):  # noqa: ARG001
  if signum == signal.SIGINT and _STOP.is_set():
    raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
  _STOP.set()


# ----- setup --------------------------------------------------------------------------------------------------


def host_params(params: Any) -> Any:
  """Full numpy copies of (possibly multi-host sharded) params, on every process."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(params, tiled=True)
  return jax.device_get(params)


# ----- logging ------------------------------------------------------------------------------------------------


class _Recorder:
  """Reads step metrics one step late, feeds the progress bar and TensorBoard, tracks tokens/s."""

  def __init__(self, cfg: TrainConfig, run_dir: pathlib.Path, start: int, schedule):
    self.cfg, self.primary, self.schedule, self.run_dir = cfg, jax.process_index() == 0, schedule, run_dir
    self.bar = None
    self.writer = None
    if self.primary and cfg.progress:
      from tqdm import tqdm

      self.bar = tqdm(total=cfg.num_steps, initial=start, file=sys.stderr, dynamic_ncols=True, desc="train")
    if self.primary:
      from tensorboardX import SummaryWriter

      self.writer = SummaryWriter(str(run_dir / "tb"))
    self.last: dict[str, Any] = {}
    self.t_prev = time.perf_counter()
    self.first = True
    self.tokens = 0.0
    self.seconds = 0.0
    # Tokens trained on since step 0, carried across resumes through the run's own metrics file (learning curves
    # are plotted against it).
    self.tokens_trained = 0.0
    metrics = run_dir / "metrics.jsonl"
    if self.primary and start and metrics.exists():
      for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and row.get("step", 0) <= start and "tokens_trained" in row:
          self.tokens_trained = row["tokens_trained"]

  def record(self, step: int, metrics: Any) -> dict[str, Any]:
    m = jax.device_get(metrics)
    now = time.perf_counter()
    dt, self.t_prev = now - self.t_prev, now
    if self.first:  # the first interval holds the compilation: keep it out of the throughput
      self.first = False
      self.first_dt, self.first_tokens = dt, float(m["tokens"])
    else:
      self.tokens += float(m["tokens"])
      self.seconds += dt
    self.tokens_trained += float(m["tokens"])
    self.last = {"step": step, "tokens_trained": self.tokens_trained, "ttt_steps": len(m["acc_j"]),
                 "loss": float(m["loss"]), "acc_j": [float(a) for a in m["acc_j"]],
                 "loss_j": [float(x) for x in m["loss_j"]], "ce_j": [float(x) for x in m["ce_j"]],
                 "grad_norm": float(m["grad_norm"]), "tokens_per_s": self.tokens_per_s, "stop": bool(m["stop"])}
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", acc_0=f"{self.last['acc_j'][0]:.3f}",
                           tok_s=f"{self.tokens_per_s:.0f}")
    if self.primary and (step % self.cfg.log_every == 0 or step == 1):
      self.last["lr"] = float(self.schedule(step - 1))
      self.scalars("train", {k: v for k, v in self.last.items() if k not in ("step", "stop", "ttt_steps")}, step)
      with open(self.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "train"} | self.last) + "\n")
    return self.last

  @property
  def tokens_per_s(self) -> float:
    if self.seconds > 0:
      return self.tokens / self.seconds
    return self.first_tokens / self.first_dt if not self.first and self.first_dt > 0 else 0.0

  def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
    """TensorBoard scalars (a list value `x_j` becomes x_0, x_1, ...); eval results also go to metrics.jsonl."""
    if not self.primary:
      return
    for k, v in values.items():
      name = k[:-2] if k.endswith("_j") else k
      for j, x in enumerate(v) if isinstance(v, (list, tuple)) else [(None, v)]:
        self.writer.add_scalar(f"{prefix}/{name}" + ("" if j is None else f"_{j}"), float(x), step)
    if prefix != "train":
      with open(self.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": prefix, "step": step, "tokens_trained": self.tokens_trained} | values) + "\n")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


# ----- eval and export ----------------------------------------------------------------------------------------


def evaluate(eval_fn, params: Any, target_params: Any, vocab: DraftVocab, cfg: TrainConfig, tokenizer, mesh
             ) -> dict[str, Any]:
  """acc_j, loss and simulated τ over the first eval_batches held-out batches (every process runs the same count:
  a process whose shard ran out feeds empty rows, which add nothing to the sums)."""
  it = data.make_iterator(cfg.data, tokenizer, split="eval")
  sums = None
  for _ in range(cfg.eval_batches):
    local = next(it, None)
    local = setup._empty_batch(cfg) if local is None else local
    m = eval_fn(params, target_params, vocab, step_lib.global_batch(mesh, local))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
  out = step_lib.finish_eval(jax.device_get(sums), cfg.eval_batches)
  return {"loss": float(out["loss"]), "ce_j": [float(x) for x in out["ce_j"]],
          "acc_j": [float(a) for a in out["acc_j"]], "tau": out["tau"]}


def export_draft(path: pathlib.Path, params: Any, vm: DraftVocab, statics: step_lib.StepStatics,
                 cfg: TrainConfig, tokenizer, target_params: Any = None) -> str:
  """Writes the draft in the official EAGLE-3 layout (safetensors + config.json), from process 0; a Qwen3-style
  (qk_norm), sliding-window or multi-layer draft, which that layout cannot express, in the speculators layout with
  the target's embedding."""
  from eagle3_jax import interop

  params = host_params(params)
  embed = None  # gathered on every process (a collective), written by process 0
  dc = statics.draft_cfg
  speculators = dc.qk_norm or dc.sliding_window is not None or dc.num_layers > 1
  if speculators and target_params is not None:
    embed = host_params(statics.target.embed(target_params))
  if jax.process_index() == 0:
    tcfg = statics.target_cfg
    from eagle3_jax.target import load

    # The verifier by the name peers resolve (speculators calls AutoConfig on it): a hub id and architecture.
    verifier = cfg.target.path or ("random" if cfg.target.random else load.DEFAULT_TARGET_HUB_ID)
    extra = {"verifier": verifier, "verifier_architectures": [getattr(tcfg, "architecture", "LlamaForCausalLM")],
             "max_position_embeddings": tcfg.max_position_embeddings}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(tokenizer, name, None) is not None:
        extra[name] = int(getattr(tokenizer, name))
    ckpt = interop.DraftCheckpoint(cfg=statics.draft_cfg, params=params, vocab=vm,
                                   aux_layer_ids=tuple(tcfg.aux_layer_ids), source_layout="jax", extra=extra)
    if speculators:
      interop.write_draft(path, ckpt, layout="speculators", overwrite=True, target_embed=embed)
    else:
      interop.write_draft(path, ckpt, layout="eagle", overwrite=True)  # a resumed run re-exports
  return str(path)


# ----- the run ------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, target: tuple[Any, Any] | None = None) -> dict[str, Any]:
  """Runs (or resumes) the training described by cfg; returns the summary printed as the last stdout line.

  `target` = (target config, params) brings a target of any model family instead of cfg.target's: the config is
  hashable, has the fields a draft reads and an `as_target()` giving its protocol Target (target/protocol.py).
  """
  _STOP.clear()
  if cfg.distributed:
    setup.init_distributed(cfg)
  primary = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  run_dir = pathlib.Path(cfg.run_dir).absolute()
  if primary:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))

  target_cfg, target_params = setup.load_target(cfg, mesh) if target is None else target
  tokenizer = setup.load_tokenizer(cfg)
  statics = step_lib.StepStatics.of(cfg, target_cfg)
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpointing)
  latest = ckpt.latest_step()
  warm = setup.warm_start(cfg, target_cfg, statics.draft_cfg) if cfg.init_from and latest is None else None
  vm = setup.draft_vocab(cfg, run_dir, tokenizer, target_cfg, warm)
  vocab = DraftVocab.from_ids(vm.target_ids(), target_cfg.vocab_size)  # int32 device buffers; counts stay here
  train_it = setup.train_iterator(cfg, tokenizer, target_cfg, target_params)
  shapes = setup.batch_shapes(cfg, target_cfg, online=statics.online)
  steps = step_lib.build_steps(statics, cfg.optim, cfg.num_steps, mesh, cfg.target.dtype, tuple(shapes.items()))
  train_fns = {cfg.ttt.steps: steps.train}
  has_eval = bool(cfg.data.eval_source or cfg.data.eval_fraction)

  if latest is None:
    state = steps.init(jax.random.key(cfg.draft.init_seed))
    if warm is not None:
      log.info("draft weights from %s", cfg.init_from)
      params = jax.tree.map(lambda x: np.asarray(x, np.float32), warm.params)
      state = state.replace(params=jax.device_put(params, steps.state_sh.params))
  else:
    log.info("resuming from %s step %d", ckpt.directory, latest)
    state = ckpt.restore(latest, step_lib.abstract_state(mesh, statics.draft_cfg, steps.tx), train_it)
  step = int(jax.device_get(state.step))

  previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  recorder = _Recorder(cfg, run_dir, step, step_lib.lr_schedule(cfg.optim, cfg.num_steps))
  saved_at, stopped, pending, last_eval, export_dir = latest, False, None, None, None
  end = min(cfg.num_steps, cfg.stop_after or cfg.num_steps)
  deadline = time.monotonic() + cfg.time_limit_s if cfg.time_limit_s else None
  timed_out = False
  try:
    while step < end and not stopped:
      if deadline is not None and not timed_out and time.monotonic() > deadline:
        log.info("time limit of %.0f s reached at step %d: stopping", cfg.time_limit_s, step)
        timed_out = True  # raised through the stop flag, so every host stops at the same step
        _STOP.set()
      batch = step_lib.global_batch(mesh, next(train_it))
      flags = step_lib.stop_flags(mesh, cfg.data.batch_size, _STOP.is_set())
      R = cfg.ttt.steps_at(step)
      if R not in train_fns:  # one compiled step per curriculum phase, built when the phase begins
        train_fns[R] = step_lib.build_steps(dataclasses.replace(statics, ttt_steps=R), cfg.optim, cfg.num_steps,
                                             mesh, cfg.target.dtype, tuple(shapes.items())).train
      state, metrics = train_fns[R](state, target_params, vocab, batch, flags)
      step += 1
      if pending is not None:  # the previous step's metrics: waiting for them overlaps this step's dispatch
        stopped = recorder.record(*pending)["stop"]
      pending = (step, metrics)
      if stopped:
        break
      if step % cfg.checkpoint_every == 0 and step < end:
        ckpt.save(step, state, train_it)
        saved_at = step
      if has_eval and cfg.eval_every and step % cfg.eval_every == 0:
        last_eval = evaluate(steps.eval, state.params, target_params, vocab, cfg, tokenizer, mesh)
        recorder.scalars("eval", last_eval, step)
      if cfg.export and cfg.export_every and step % cfg.export_every == 0:
        export_dir = export_draft(run_dir / f"export_step_{step}", state.params, vm, statics, cfg, tokenizer,
                                  target_params)
    if pending is not None:
      stopped = recorder.record(*pending)["stop"] or stopped
    if saved_at != step:
      ckpt.save(step, state, train_it)
      log.info("checkpoint of step %d started", step)
    if timed_out or (not stopped and step >= cfg.num_steps):
      if has_eval and (last_eval is None or cfg.eval_every == 0 or step % cfg.eval_every):
        last_eval = evaluate(steps.eval, state.params, target_params, vocab, cfg, tokenizer, mesh)
        recorder.scalars("eval", last_eval, step)
      if cfg.export:
        export_dir = export_draft(run_dir / "export", state.params, vm, statics, cfg, tokenizer, target_params)
        log.info("draft exported to %s", export_dir)
    ckpt.close()
    log.info("checkpoints written to %s", ckpt.directory)
  finally:
    recorder.close()
    for s, handler in previous.items():
      signal.signal(s, handler)
  last = recorder.last
  stats = getattr(train_it, "stats", None)
  return {"step": step, "loss": last.get("loss"), "acc_0": (last.get("acc_j") or [None])[0],
          "acc_j": last.get("acc_j"), "tokens_per_s": last.get("tokens_per_s"),
          "checkpoint_dir": str(ckpt.directory), "export_dir": export_dir, "run_dir": str(run_dir),
          "stopped_by_signal": bool(stopped) and not timed_out, "timed_out": timed_out, "resumed_from": latest,
          "eval": last_eval,
          "draft_vocab_coverage": vm.provenance.get("coverage"),
          "data": stats.as_dict() if stats is not None else None}
