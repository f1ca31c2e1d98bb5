"""Frozen, hashable configuration dataclasses and the `--config FILE.py key=value` loader."""

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
