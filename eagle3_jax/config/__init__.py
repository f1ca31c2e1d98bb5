"""Every frozen *Config dataclass of the project, found here, and the `--config FILE.py key=value` loader.

model.py holds the models' shapes (LlamaConfig, RopeScaling, DraftConfig), decode.py the decoding settings
(SamplingConfig, TreeConfig, SpecConfig, SlotConfig, SpecSlotConfig), train.py a training run (TrainConfig, its
sections, MeshConfig, DataConfig) and regeneration (RegenConfig). The modules that run a config also expose it
(`tree.TreeConfig`, `head.DraftConfig`, ...). Nothing here imports JAX, so a config file stays cheap to load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any

from eagle3_jax.config.decode import SamplingConfig, SlotConfig, SpecConfig, SpecSlotConfig, TreeConfig
from eagle3_jax.config.model import DraftConfig, LlamaConfig, RopeScaling
from eagle3_jax.config.train import (
    SHAREGPT,
    DataConfig,
    MeshConfig,
    OptimConfig,
    RegenConfig,
    TrainConfig,
    TrainDraftConfig,
    TrainTargetConfig,
    TTTConfig,
)

__all__ = ["SHAREGPT", "DataConfig", "DraftConfig", "LlamaConfig", "MeshConfig", "OptimConfig", "RegenConfig",
           "RopeScaling", "SamplingConfig", "SlotConfig", "SpecConfig", "SpecSlotConfig", "TTTConfig",
           "TrainConfig", "TrainDraftConfig", "TrainTargetConfig", "TreeConfig", "apply_overrides", "load_config"]


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
