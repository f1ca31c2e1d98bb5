"""The training run: multi-host setup, target, draft vocabulary, automatic resume, the step loop with SIGTERM-safe
checkpoints, progress bar and TensorBoard scalars, held-out eval and draft export."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eagle3_jax.train import checkpoint, data, features, step as step_lib
from eagle3_jax import sharding
from eagle3_jax.draft import vocab as vocab_lib
from eagle3_jax.config import LlamaConfig
from eagle3_jax.draft.head import DraftVocab
from eagle3_jax.config import TrainConfig

log = logging.getLogger(__name__)
_STOP = threading.Event()  # set by SIGTERM / SIGINT; the loop saves and exits at the next step boundary


def _on_signal(signum, frame):  # noqa: ARG001
  if signum == signal.SIGINT and _STOP.is_set():
    raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
  _STOP.set()


# ----- setup --------------------------------------------------------------------------------------------------


def init_distributed(cfg: TrainConfig) -> None:
  """jax.distributed.initialize() from the config; unset fields are auto-detected (TPU pods, SLURM, ...)."""
  kw: dict[str, Any] = {}
  if cfg.coordinator_address:
    kw["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kw["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kw["process_id"] = cfg.process_id
  jax.distributed.initialize(**kw)


def char_tokenizer():
  """A character-level ChatML tokenizer built in memory (≤ 100 ids): lets configs/tiny.py run with no files."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
  chars = ["\n"] + [chr(c) for c in range(32, 127)]
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                               bos_token="<|im_start|>", additional_special_tokens=specials[2:])
  hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  return hf


def load_tokenizer(cfg: TrainConfig):
  if cfg.target.tokenizer == "char":
    return char_tokenizer()
  from eagle3_jax.target import loading

  return loading.load_tokenizer(cfg.target.tokenizer or cfg.target.path)


def load_target(cfg: TrainConfig, mesh) -> tuple[LlamaConfig, Any]:
  """(config, params) of the frozen target, placed in the rules-table shardings."""
  dtype = jnp.dtype(cfg.target.dtype)
  if cfg.target.random is not None:
    tcfg = cfg.target.random
    return tcfg, step_lib.random_target(jax.random.key(cfg.target.seed), mesh, tcfg, dtype=dtype,
                                         init_std=cfg.target.random_init_std)
  from eagle3_jax.target import loading

  tcfg, params = loading.load_target(cfg.target.path, mesh=mesh, dtype=dtype)
  if cfg.target.aux_layers is not None:
    tcfg = dataclasses.replace(tcfg, aux_layers=tuple(cfg.target.aux_layers))
  return tcfg, jax.device_put(params, step_lib.target_shardings(mesh, tcfg, dtype))


def warm_start(cfg: TrainConfig, target_cfg: LlamaConfig, draft_cfg: Any) -> Any:
  """The DraftCheckpoint named by cfg.init_from, checked against this run's target taps and draft shape."""
  from eagle3_jax import interop

  ckpt = interop.read_draft(cfg.init_from, num_target_layers=target_cfg.num_layers)
  if tuple(ckpt.aux_layer_ids) != tuple(target_cfg.aux_layer_ids):
    raise ValueError(f"init_from={cfg.init_from} reads target layers {tuple(ckpt.aux_layer_ids)}, this run "
                     f"{tuple(target_cfg.aux_layer_ids)}")
  if ckpt.cfg != draft_cfg:
    diff = [f.name for f in dataclasses.fields(draft_cfg) if getattr(ckpt.cfg, f.name) != getattr(draft_cfg, f.name)]
    raise ValueError(f"init_from={cfg.init_from} is a draft of another shape ({', '.join(diff)} differ from this "
                     "run's config)")
  return ckpt


def draft_vocab(cfg: TrainConfig, run_dir: pathlib.Path, tokenizer, target_cfg: LlamaConfig,
                warm: Any = None) -> vocab_lib.VocabMap:
  """The run's draft vocabulary: built from the training split on the first start (or taken from the init_from
  draft), reused (and checked against this dataset and tokenizer, or that draft) on every later one. Process 0
  builds; the others wait and read."""
  V = target_cfg.vocab_size
  Vd = min(cfg.draft.draft_vocab_size, V)
  path = run_dir / "draft_vocab.safetensors"
  kw = dict(vocab_size=V, max_examples=cfg.draft.vocab_max_examples)
  expect = (vocab_lib.vocab_provenance(cfg.data, tokenizer, Vd, **kw) if not cfg.init_from else
            {"format": vocab_lib.FORMAT_VERSION, "init_from": str(cfg.init_from), "vocab_size": V,
             "draft_vocab_size": Vd})
  if jax.process_index() == 0:
    if cfg.init_from and not path.exists():
      if warm is None:
        raise ValueError(f"{run_dir} has checkpoints but no draft vocabulary; it cannot be resumed")
      t2d = np.asarray(warm.vocab.t2d, bool)
      vm = vocab_lib.VocabMap(d2t=np.asarray(warm.vocab.d2t, np.int64), t2d=t2d, counts=np.zeros((V,), np.int64),
                              provenance=expect)
      vocab_lib.save_vocab(path, vm)
    elif cfg.init_from:
      vm = vocab_lib.load_vocab(path, expect=expect)
    else:
      vm = vocab_lib.load_or_build_vocab(path, cfg.data, tokenizer, Vd, **kw)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("draft_vocab")
  if jax.process_index() != 0:
    vm = vocab_lib.load_vocab(path, expect=expect)
  return vm


def dump_batches(cfg: TrainConfig, tokenizer, *, token_budget: int = 4096) -> Iterator[dict[str, np.ndarray]]:
  """The training split once, sorted by length and cut into length-bucketed batches of about token_budget
  tokens: the feature dump runs the target over (almost) no padding. Deterministic, so a dump resumes."""
  examples = list(data.iterate_examples(cfg.data, tokenizer, split="train"))
  order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
  buckets = np.asarray(features.bucket_lengths(cfg.data.max_length))
  i = 0
  while i < len(order):
    T = int(buckets[np.searchsorted(buckets, len(examples[order[i]][0]))])
    B = max(1, token_budget // T)
    idx = [j for j in order[i:i + B] if len(examples[j][0]) <= T]  # sorted: stops at the next bucket
    i += len(idx)
    batch = {"tokens": np.zeros((len(idx), T), np.int32), "loss_mask": np.zeros((len(idx), T), np.int32),
             "lengths": np.array([len(examples[j][0]) for j in idx], np.int32)}
    for row, j in enumerate(idx):
      batch["tokens"][row, :len(examples[j][0])] = examples[j][0]
      batch["loss_mask"][row, :len(examples[j][0])] = examples[j][1]
    yield batch


def ensure_features(cfg: TrainConfig, tokenizer, target_cfg: LlamaConfig, target_params: Any) -> None:
  """Dumps (or finishes dumping) the offline feature store of the training split if it is not complete."""
  index = pathlib.Path(cfg.feature_dir) / features.INDEX
  dataset = json.dumps(data.dataset_fingerprint(cfg.data), sort_keys=True)
  if index.exists():
    stored = json.loads(index.read_text())
    if stored.get("dataset") != dataset:  # e.g. the source file grew since the dump: never train on stale rows
      raise ValueError(f"feature store {cfg.feature_dir} was dumped from other data ({stored.get('dataset')}), "
                       f"this run reads {dataset}; delete it or set another feature_dir")
    if stored.get("complete"):
      return
  if jax.process_count() > 1:
    raise ValueError(f"feature store {cfg.feature_dir} is missing or incomplete; dump it in a single process first")
  log.info("dumping target features of %s to %s", cfg.data.source, cfg.feature_dir)
  t0 = time.perf_counter()
  batches = list(dump_batches(cfg, tokenizer))  # token ids only: small, and the bar gets its total
  out = features.dump_features(cfg.feature_dir, batches, target_params, target_cfg=target_cfg,
                               target_name=cfg.target.path or "default", dataset=dataset,
                               dtype=cfg.feature_dtype, resume=True, seq_len=cfg.data.max_length,
                               examples_per_shard=128,  # a kill loses at most one shard (~5 min on 2 CPU cores)
                               total=sum(len(b["lengths"]) for b in batches), progress=cfg.progress)
  log.info("feature store: %d examples, %d tokens in %.0f s", out["num_examples"], out["num_tokens"],
           time.perf_counter() - t0)


def train_iterator(cfg: TrainConfig, tokenizer, target_cfg: LlamaConfig, target_params: Any):
  """Checkpointable iterator of this process's batches: tokenised conversations, or stored features (offline,
  in length buckets)."""
  if cfg.features == "online":
    return data.make_iterator(cfg.data, tokenizer, split="train")
  ensure_features(cfg, tokenizer, target_cfg, target_params)
  # The fingerprint reads weight corners, which needs every shard on this host: single-process runs only.
  store = features.FeatureStore(cfg.feature_dir, target_cfg=target_cfg,
                                target_params=target_params if jax.process_count() == 1 else None)
  if store.seq_len != cfg.data.max_length:
    raise ValueError(f"feature store {cfg.feature_dir} holds sequences of {store.seq_len} tokens but "
                     f"data.max_length={cfg.data.max_length}; set data.max_length={store.seq_len}")
  return features.BucketedBatches(store, cfg.data.batch_size, seed=cfg.data.seed,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())


def batch_shapes(cfg: TrainConfig, target_cfg: LlamaConfig, *, online: bool) -> dict[str, tuple[int, ...]]:
  """Global shapes of one batch (for shardings, before any batch exists)."""
  B, T, D = cfg.data.batch_size * jax.process_count(), cfg.data.max_length, target_cfg.hidden_size
  shapes = {"tokens": (B, T), "loss_mask": (B, T), "lengths": (B,)}
  if not online:
    shapes |= {"aux": (B, T, D * len(target_cfg.aux_layer_ids)), "hidden": (B, T, D), "argmax": (B, T)}
  return shapes


def _empty_batch(cfg: TrainConfig) -> dict[str, np.ndarray]:
  B, T = cfg.data.batch_size, cfg.data.max_length
  return {"tokens": np.zeros((B, T), np.int32), "loss_mask": np.zeros((B, T), np.int32),
          "lengths": np.zeros((B,), np.int32)}


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
    local = _empty_batch(cfg) if local is None else local
    m = eval_fn(params, target_params, vocab, step_lib.global_batch(mesh, local))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
  out = step_lib.finish_eval(jax.device_get(sums), cfg.eval_batches)
  return {"loss": float(out["loss"]), "ce_j": [float(x) for x in out["ce_j"]],
          "acc_j": [float(a) for a in out["acc_j"]], "tau": out["tau"]}


def export_draft(path: pathlib.Path, params: Any, vm: vocab_lib.VocabMap, statics: step_lib.StepStatics,
                 cfg: TrainConfig, tokenizer) -> str:
  """Writes the draft in the official EAGLE-3 layout (safetensors + config.json), from process 0."""
  from eagle3_jax import interop

  params = host_params(params)
  if jax.process_index() == 0:
    tcfg = statics.target_cfg
    from eagle3_jax.target import loading

    # The verifier by the name peers resolve (speculators calls AutoConfig on it): a hub id and architecture.
    verifier = cfg.target.path or ("random" if cfg.target.random else loading.DEFAULT_TARGET_HUB_ID)
    extra = {"verifier": verifier, "verifier_architectures": [getattr(tcfg, "architecture", "LlamaForCausalLM")],
             "max_position_embeddings": tcfg.max_position_embeddings}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      if getattr(tokenizer, name, None) is not None:
        extra[name] = int(getattr(tokenizer, name))
    ckpt = interop.DraftCheckpoint(cfg=statics.draft_cfg, params=params,
                                   vocab=DraftVocab(d2t=np.asarray(vm.d2t, np.int64), t2d=np.asarray(vm.t2d)),
                                   aux_layer_ids=tuple(tcfg.aux_layer_ids), source_layout="jax", extra=extra)
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
    init_distributed(cfg)
  primary = jax.process_index() == 0
  mesh = sharding.make_mesh(cfg.mesh)
  run_dir = pathlib.Path(cfg.run_dir).absolute()
  if primary:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))

  target_cfg, target_params = load_target(cfg, mesh) if target is None else target
  tokenizer = load_tokenizer(cfg)
  statics = step_lib.StepStatics.of(cfg, target_cfg)
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpointing)
  latest = ckpt.latest_step()
  warm = warm_start(cfg, target_cfg, statics.draft_cfg) if cfg.init_from and latest is None else None
  vm = draft_vocab(cfg, run_dir, tokenizer, target_cfg, warm)
  vocab = DraftVocab.from_ids(vm.ids, target_cfg.vocab_size)
  train_it = train_iterator(cfg, tokenizer, target_cfg, target_params)
  shapes = batch_shapes(cfg, target_cfg, online=statics.online)
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
  try:
    while step < end and not stopped:
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
        export_dir = export_draft(run_dir / f"export_step_{step}", state.params, vm, statics, cfg, tokenizer)
    if pending is not None:
      stopped = recorder.record(*pending)["stop"] or stopped
    if saved_at != step:
      ckpt.save(step, state, train_it)
      log.info("checkpoint of step %d started", step)
    if not stopped and step >= cfg.num_steps:
      if has_eval and (last_eval is None or cfg.eval_every == 0 or step % cfg.eval_every):
        last_eval = evaluate(steps.eval, state.params, target_params, vocab, cfg, tokenizer, mesh)
        recorder.scalars("eval", last_eval, step)
      if cfg.export:
        export_dir = export_draft(run_dir / "export", state.params, vm, statics, cfg, tokenizer)
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
          "stopped_by_signal": bool(stopped), "resumed_from": latest, "eval": last_eval,
          "draft_vocab_coverage": vm.provenance.get("coverage"),
          "data": stats.as_dict() if stats is not None else None}
