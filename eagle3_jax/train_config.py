"""Frozen dataclasses describing one training run: target, draft, data, optimiser, TTT, mesh, checkpoints, logging."""

from __future__ import annotations

import dataclasses

from eagle3_jax.config import LlamaConfig
from eagle3_jax.train.data import DataConfig
from eagle3_jax.sharding import MeshConfig

_DTYPES = ("float32", "bfloat16")


def _check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{owner}.{name}={value!r}; expected one of {choices}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetSpec:
  """Which frozen target to train against."""

  path: str | None = None  # HF directory or .gguf; None: the embedded SmolLM2-135M-Instruct GGUF
  random: LlamaConfig | None = None  # a random target of this shape, built locally (tests, CI); overrides path
  random_init_std: float = 0.02  # larger values give the random target peaked (learnable) distributions
  seed: int = 0
  dtype: str = "bfloat16"  # storage and compute dtype of the frozen target
  aux_layers: tuple[int, ...] | None = None  # target layers whose inputs the draft reads (None: the default taps)
  tokenizer: str | None = None  # HF dir / .gguf; "char": an in-memory char-level ChatML one; None: the target's

  def __post_init__(self):
    _check_choice("TargetSpec", "dtype", self.dtype, _DTYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftSpec:
  """The draft head, shaped from the target by DraftConfig.for_target."""

  draft_vocab_size: int = 32000  # Vd; clipped to the target vocabulary
  rope_theta: float = 10000.0  # the official checkpoints use 10000 whatever the target's theta
  init_seed: int = 0
  vocab_max_examples: int | None = None  # count draft-vocab frequencies over the first N training rows (None: all)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSpec:
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
    _check_choice("OptimSpec", "warmup", self.warmup, ("linear", "log"))
    _check_choice("OptimSpec", "decay", self.decay, ("linear", "cosine", "constant"))
    if self.grad_accum < 1:
      raise ValueError(f"OptimSpec.grad_accum={self.grad_accum} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TTTSpec:
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
    _check_choice("TTTSpec", "loss_norm", self.loss_norm, ("batch", "tokens"))
    phases = self.phases()
    if phases and (phases[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(phases, phases[1:]))
                   or any(not 1 <= r <= self.steps for _, r in phases)):
      raise ValueError(f"TTTSpec.schedule={self.schedule!r}: expected STEP:R pairs with STEP ascending from 0 and "
                       f"1 <= R <= steps={self.steps}")

  def phases(self) -> tuple[tuple[int, int], ...]:
    try:
      return tuple((int(a), int(b)) for a, b in (p.split(":") for p in self.schedule.split(",") if p.strip()))
    except ValueError:
      raise ValueError(f"TTTSpec.schedule={self.schedule!r}: expected STEP:R,... (e.g. 0:1,3000:7)") from None

  def steps_at(self, step: int) -> int:
    """R for the optimiser step that follows `step` steps taken."""
    return next((r for start, r in reversed(self.phases()) if step >= start), self.steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """A whole run. Static: the pieces that shape the jitted step are hashable."""

  target: TargetSpec = TargetSpec()
  draft: DraftSpec = DraftSpec()
  data: DataConfig = DataConfig()  # data.batch_size is per process: global batch = it × process count
  optim: OptimSpec = OptimSpec()
  ttt: TTTSpec = TTTSpec()
  mesh: MeshConfig = MeshConfig()
  compute_dtype: str = "float32"  # draft forward/backward dtype; master weights and Adam moments stay fp32
  features: str = "online"  # "online": target inside the step; "offline": read a feature store
  feature_dir: str = ""  # offline feature store (eagle3_jax.train.features); dumped from data.source if incomplete
  feature_dtype: str = "bfloat16"  # storage dtype of dumped features (2304 values a token for SmolLM2)
  num_steps: int = 1000  # optimiser steps (the lr schedule spans these)
  stop_after: int = 0  # end this invocation at this step (checkpoint, exit; resume later), 0 = at num_steps
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
                       f"OptimSpec.grad_accum={self.optim.grad_accum}")
