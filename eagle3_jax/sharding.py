"""The device mesh and the one table that maps logical axis names to mesh axes."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eagle3_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. The single place that decides what data, FSDP and tensor parallelism mean:
# weights are split over fsdp along their model dimension and over tensor along heads / mlp / vocab;
# batches over (data, fsdp); KV caches follow the batch and the kv heads.
DEFAULT_RULES: Mapping[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "draft_vocab": "tensor",
    "aux": None,
    "norm": None,
    "layers": None,
}



def make_mesh(cfg: MeshConfig = MeshConfig(), devices: list | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = [cfg.data, cfg.fsdp, cfg.tensor]
  if shape.count(-1) > 1:
    raise ValueError(f"MeshConfig {cfg}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"MeshConfig {cfg}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"MeshConfig {cfg} needs {math.prod(shape)} devices, have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: tuple[str | None, ...], *, rules: Mapping = DEFAULT_RULES,
                    mesh: Mesh | None = None, shape: tuple[int, ...] | None = None) -> P:
  """PartitionSpec for logical axes; refuses a mesh axis used twice; replicates dims the mesh cannot divide."""
  used: dict[str, str] = {}
  out = []
  for i, name in enumerate(axes):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    target = rules[name]
    target = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    if mesh is not None:
      target = tuple(a for a in target if mesh.shape[a] > 1)
      if shape is not None and target:
        size = math.prod(mesh.shape[a] for a in target)
        if shape[i] % size:
          # Small models (e.g. 3 kv heads on a tensor axis of 2) stay correct by replicating that dim.
          target = ()
    for a in target:
      if a in used:
        raise ValueError(f"logical axes {used[a]!r} and {name!r} both map to mesh axis {a!r} in {axes}")
      used[a] = name
    out.append(None if not target else target[0] if len(target) == 1 else target)
  return P(*out)


def named_sharding(mesh: Mesh, axes: tuple[str | None, ...], shape: tuple[int, ...] | None = None,
                   rules: Mapping = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, rules=rules, mesh=mesh, shape=shape))


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any, rules: Mapping = DEFAULT_RULES) -> Any:
  """Maps a pytree of logical-axis tuples (and matching shapes) to NamedShardings."""
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(lambda ax, sh: named_sharding(mesh, ax, tuple(sh.shape), rules),
                      axes_tree, shapes_tree, is_leaf=is_axes)


def constrain(x: jax.Array, mesh: Mesh | None, axes: tuple[str | None, ...],
              rules: Mapping = DEFAULT_RULES) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without a mesh (single-device use)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))
