"""Per-device memory of a training configuration, without devices: shard shapes from jax.eval_shape and the rules
table on an AbstractMesh for the weights and optimiser state, and arithmetic for the activations."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from eagle3_jax import sharding
from eagle3_jax.config import LlamaConfig, MeshConfig, TrainConfig
from eagle3_jax.draft import head as draft
from eagle3_jax.target import llama
from eagle3_jax.train import step as step_lib

GiB = 1 << 30
HBM_BYTES = {"tpu_v5p": 95 * GiB, "tpu_v5e": 16 * GiB, "h100": 80 * GiB, "h200": 141 * GiB, "a100_80g": 80 * GiB}


def abstract_mesh(mesh_cfg: MeshConfig, num_devices: int) -> AbstractMesh:
  shape = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if -1 in shape:
    shape[shape.index(-1)] = num_devices // math.prod(s for s in shape if s != -1)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {mesh_cfg} does not cover {num_devices} devices")
  return AbstractMesh(tuple(shape), sharding.MESH_AXES)


def _shard_bytes(mesh: AbstractMesh, axes_tree: Any, abstract_tree: Any) -> int:
  shardings = sharding.tree_shardings(mesh, axes_tree, abstract_tree)
  sizes = jax.tree.map(lambda a, s: math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize,
                       abstract_tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def _total_bytes(tree: Any) -> int:
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def memory_budget(cfg: TrainConfig, target_cfg: LlamaConfig, *, num_devices: int, num_processes: int = 1
                  ) -> dict[str, Any]:
  """Bytes per device of each part of a train step (upper-bound arithmetic for activations; see comments).

  Weights and optimiser state come from jax.eval_shape of the real init functions, sharded by the real rules
  table on an AbstractMesh of `num_devices`, so they move with any change to the parameter tables or rules.
  """
  mesh = abstract_mesh(cfg.mesh, num_devices)
  tdtype, cdtype = jnp.dtype(cfg.target.dtype), jnp.dtype(cfg.compute_dtype)
  statics = step_lib.StepStatics.of(cfg, target_cfg)
  dcfg = statics.draft_cfg
  tx = step_lib.make_optimizer(cfg.optim, cfg.num_steps)
  state = jax.eval_shape(functools.partial(step_lib.init_state, draft_cfg=dcfg, tx=tx), jax.random.key(0))
  state_sh = step_lib.state_shardings(mesh, dcfg, tx)
  shard = lambda a, s: math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize  # noqa: E731
  draft_params = int(sum(jax.tree.leaves(jax.tree.map(shard, state.params, state_sh.params))))
  opt_leaves = [(a, s) for a, s in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(
      state_sh.opt_state, is_leaf=lambda x: isinstance(x, NamedSharding)))]
  opt_state = int(sum(shard(a, s) for a, s in opt_leaves))
  target_abstract = llama.abstract_params(target_cfg, tdtype)
  target_weights = _shard_bytes(mesh, llama.param_axes(target_cfg), target_abstract)

  m = dict(mesh.shape)
  t = m["tensor"]
  rows = cfg.data.batch_size * num_processes // cfg.optim.grad_accum  # rows of one micro-batch, globally
  b = max(1, rows // (m["data"] * m["fsdp"]))
  T, D, F = cfg.data.max_length, target_cfg.hidden_size, target_cfg.intermediate_size
  N, K, H, V = target_cfg.num_heads, target_cfg.num_kv_heads, target_cfg.head_dim, target_cfg.vocab_size
  Vd, R, A = dcfg.draft_vocab_size, cfg.ttt.steps, dcfg.num_aux * dcfg.target_hidden_size
  Nt, Kt, Ft = math.ceil(N / t), math.ceil(K / t), math.ceil(F / t)
  tb, cb, f32 = tdtype.itemsize, cdtype.itemsize, 4

  # FSDP all-gathers each weight before use: the largest target layer twice (the next layer's gather overlaps),
  # and the whole (one-layer) draft in compute dtype plus its fp32 gradient before reduce-scatter.
  layer = _total_bytes(llama.abstract_layer(target_cfg, tdtype)) // t
  gathered = 2 * layer + _total_bytes(draft.abstract_params(dcfg, cdtype)) // t + draft_params
  grads = draft_params * (2 if cfg.optim.grad_accum > 1 else 1)  # fp32 gradients (+ the accumulator)

  # Target forward, no gradient: residual + aux taps + final hidden stay; one layer's internals are transient.
  target_keep = b * T * (D + A + D) * tb
  target_layer = max(b * Nt * T * T * (f32 + tb), 3 * b * T * Ft * tb) + 4 * b * T * D * tb
  # Teacher: Vd logits and probs in fp32, one 16384-column chunk of the full-vocab argmax.
  teacher = b * T * (2 * Vd * f32 + min(V, 16384) * f32)
  # TTT forward kept for the backward, per step: embedding, [norm(emb), norm(h)], q, scores (fp32) and probs,
  # attention out, residuals, SwiGLU gate/up/product, fp32 logits and log-softmax, the step's slice of the
  # padded teacher probs; the scan also saves its carry, whose K/V buffers are [R,b,T,K,H] each.
  per_step = (b * T * (D + 2 * D + Nt * H + 3 * D) * cb + b * Nt * T * (T + R) * (f32 + cb)
              + 3 * b * T * Ft * cb + 2 * b * T * math.ceil(Vd / t) * f32 + b * T * Vd * f32)
  carry = b * T * D * cb + 2 * R * b * T * Kt * H * cb
  ttt_padded = b * (T + R + 1) * Vd * f32
  if cfg.ttt.remat:  # only carries are kept; one step's internals are rebuilt at a time
    ttt = R * carry + per_step + ttt_padded
  else:
    ttt = R * (carry + per_step) + ttt_padded
  activations = target_keep + max(target_layer, teacher) + teacher + ttt
  total = target_weights + draft_params + opt_state + gathered + grads + activations
  return {"mesh": m, "rows_per_device": b, "target_weights": target_weights, "draft_params": draft_params,
          "optimizer_state": opt_state, "gradients": grads, "gathered_weights": gathered,
          "activations": activations, "activations_ttt": ttt, "total": total,
          "target_params": sum(math.prod(a.shape) for a in jax.tree.leaves(target_abstract)),
          "draft_param_count": sum(math.prod(a.shape) for a in jax.tree.leaves(state.params))}
