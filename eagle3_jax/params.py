"""Parameter tables: one ParamSpec per weight drives init, abstract shapes, logical axes (sharding) and I/O."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One row of a parameter table."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names, see sharding.DEFAULT_RULES
  init: str = "normal"  # "normal" (std 0.02, as transformers' Llama init), "ones", "zeros"


def is_spec(x: Any) -> bool:
  return isinstance(x, ParamSpec)


def axes_of(specs: Any) -> Any:
  return jax.tree.map(lambda s: s.axes, specs, is_leaf=is_spec)


def abstract_of(specs: Any, dtype=jnp.float32) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)


def init_from_specs(specs: Any, key: jax.Array, dtype=jnp.float32) -> Any:
  """Random weights; jit it with out_shardings to create them already sharded."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  keys = jax.random.split(key, len(leaves))
  make: dict[str, Callable] = {
      "normal": lambda k, s: 0.02 * jax.random.normal(k, s.shape, dtype),
      "ones": lambda k, s: jnp.ones(s.shape, dtype),
      "zeros": lambda k, s: jnp.zeros(s.shape, dtype),
  }
  return jax.tree.unflatten(treedef, [make[s.init](k, s) for k, s in zip(keys, leaves)])


def count_params(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
