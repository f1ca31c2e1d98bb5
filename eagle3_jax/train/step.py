"""Train state, optimiser, shardings and the jitted train / eval steps of the EAGLE-3 draft (target frozen apart)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eagle3_jax import sharding
from eagle3_jax.config import LlamaConfig, OptimConfig, TrainConfig
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.head import DraftConfig
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.params import ParamSpec, init_from_specs
from eagle3_jax.target import llama, protocol
from eagle3_jax.train import features, ttt

Batch = dict[str, jax.Array]
# Logical axes of every array a batch may carry (online: the first three; offline adds the stored features).
BATCH_AXES = {"tokens": ("batch", "seq"), "loss_mask": ("batch", "seq"), "lengths": ("batch",),
              "aux": ("batch", "seq", None), "hidden": ("batch", "seq", None), "argmax": ("batch", "seq")}


@flax.struct.dataclass
class TrainState:
  """Everything that is trained and donated: the draft params, the optimiser state, the step. Not the target."""

  step: jax.Array  # int32 scalar: optimiser steps taken
  params: Any
  opt_state: Any


def draft_config(cfg: TrainConfig, target_cfg: LlamaConfig) -> DraftConfig:
  return DraftConfig.for_target(target_cfg, min(cfg.draft.draft_vocab_size, target_cfg.vocab_size),
                                rope_theta=cfg.draft.rope_theta, norm_before_fc=cfg.draft.norm_before_fc,
                                fc_norm=cfg.draft.fc_norm, norm_before_residual=cfg.draft.norm_before_residual,
                                norm_output=cfg.draft.norm_output, qk_norm=cfg.draft.qk_norm,
                                sliding_window=cfg.draft.sliding_window, num_layers=cfg.draft.num_layers)


# ----- optimiser ----------------------------------------------------------------------------------------------


def lr_schedule(o: OptimConfig, num_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Warmup (linear, or DeepSpeed's log warmup) to o.lr, then decay to o.lr·end_lr_ratio at num_steps."""
  warmup = max(o.warmup_steps, 1)
  end = o.lr * o.end_lr_ratio

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    if o.warmup == "log":
      # WarmupDecayLR "log": lr·ln(step+1)/ln(warmup); +1 inside so step 0 already moves (ln 2 / ln warmup).
      warm = o.lr * jnp.log(step + 2.0) / np.log(warmup + 1.0)
    else:
      warm = o.lr * (step + 1.0) / warmup
    frac = jnp.clip((step - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
    if o.decay == "linear":
      decayed = o.lr + (end - o.lr) * frac
    elif o.decay == "cosine":
      decayed = end + (o.lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      decayed = jnp.float32(o.lr)
    return jnp.where(step < warmup, jnp.minimum(warm, o.lr), decayed)

  return schedule


def make_optimizer(o: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm → AdamW (β=(b1, b2), weight decay on matrices only). Accumulation is in the step."""
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
  adamw = optax.adamw(lr_schedule(o, num_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw


# ----- state and shardings ------------------------------------------------------------------------------------


_ONE_DRAW_MAX = 1 << 24  # elements: 64 MB of fp32 noise, which may be replicated on every device


def init_from_table(specs: Any, key: jax.Array, dtype=jnp.float32, normal_std: float = 0.02) -> Any:
  """Weights of a parameter table ("normal" std normal_std, "ones", "zeros").

  Small tables cut all normal leaves from ONE random draw: on CPU that compiles in 1.3 s where a draw per leaf
  (params.init_from_specs) takes 7.9 s for the tiny 4-layer target, and test / CI starts are dominated by such
  compiles. Large tables draw per leaf, so that each draw is generated already sharded like its weight.
  """
  is_spec = lambda s: isinstance(s, ParamSpec)  # noqa: E731
  leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  n = sum(math.prod(s.shape) for s in leaves if s.init == "normal")
  if n > _ONE_DRAW_MAX:
    params = init_from_specs(specs, key, jnp.float32)
    return jax.tree.map(lambda s, x: (x * (normal_std / 0.02) if s.init == "normal" else x).astype(dtype),
                        specs, params, is_leaf=is_spec)
  z = normal_std * jax.random.normal(key, (n,), jnp.float32)
  out, offset = [], 0
  for s in leaves:
    if s.init == "normal":
      size = math.prod(s.shape)
      out.append(z[offset:offset + size].reshape(s.shape).astype(dtype))
      offset += size
    else:
      out.append((jnp.ones if s.init == "ones" else jnp.zeros)(s.shape, dtype))
  return jax.tree.unflatten(treedef, out)


def init_state(key: jax.Array, *, draft_cfg: DraftConfig, tx: optax.GradientTransformation) -> TrainState:
  params = init_from_table(draft.param_specs(draft_cfg), key, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(mesh: Mesh, draft_cfg: DraftConfig, tx: optax.GradientTransformation) -> TrainState:
  """NamedShardings of the train state: draft weights by the rules table, Adam moments like their weight."""
  abstract = jax.eval_shape(functools.partial(init_state, draft_cfg=draft_cfg, tx=tx), jax.random.key(0))
  params = sharding.tree_shardings(mesh, draft.param_axes(draft_cfg), abstract.params)
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                              transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt)


def abstract_state(mesh: Mesh, draft_cfg: DraftConfig, tx: optax.GradientTransformation) -> TrainState:
  """ShapeDtypeStructs carrying their shardings: the restore target for orbax."""
  abstract = jax.eval_shape(functools.partial(init_state, draft_cfg=draft_cfg, tx=tx), jax.random.key(0))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      state_shardings(mesh, draft_cfg, tx))


def target_shardings(mesh: Mesh, target_cfg: Any, dtype=jnp.bfloat16) -> Any:
  """The frozen target's weight shardings: the rules table over the Llama parameter table; a target of another
  family is replicated (one sharding for its whole pytree)."""
  if not isinstance(target_cfg, LlamaConfig):
    return NamedSharding(mesh, P())
  return sharding.tree_shardings(mesh, llama.param_axes(target_cfg), llama.abstract_params(target_cfg, dtype))


def random_target(key: jax.Array, mesh: Mesh, target_cfg: LlamaConfig, *, dtype=jnp.float32,
                  init_std: float = 0.02) -> Any:
  """A random target created sharded; init_std scales the std-0.02 'normal' weights (peakier distributions)."""
  return _random_target_fn(mesh, target_cfg, jnp.dtype(dtype), init_std)(key)


@functools.lru_cache(maxsize=4)
def _random_target_fn(mesh: Mesh, target_cfg: LlamaConfig, dtype, init_std: float) -> Callable:
  init = functools.partial(init_from_table, llama.param_specs(target_cfg), dtype=dtype, normal_std=init_std)
  return jax.jit(init, out_shardings=target_shardings(mesh, target_cfg, dtype))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> Batch:
  """This process's rows → global arrays sharded over (data, fsdp); global batch = local rows × processes."""
  out = {}
  for k, v in local.items():
    shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(
        sharding.named_sharding(mesh, BATCH_AXES[k], shape), np.asarray(v), shape)
  return out


def stop_flags(mesh: Mesh, local_rows: int, stop: bool) -> jax.Array:
  """bool[B] that is `stop` on this process's rows: the step reduces it, so every host learns any host's SIGTERM
  from the (one step late) metrics, at the same step, with no extra host round trip."""
  shape = (local_rows * jax.process_count(),)
  return jax.make_array_from_process_local_data(sharding.named_sharding(mesh, ("batch",), shape),
                                                np.full((local_rows,), stop), shape)


# ----- steps --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepStatics:
  """What shapes the jitted step (hashable)."""

  target_cfg: LlamaConfig
  draft_cfg: DraftConfig
  ttt_steps: int
  ttt_decay: float
  remat: bool
  compute_dtype: str
  grad_accum: int
  online: bool
  loss_norm: str = "batch"

  @property
  def target(self) -> protocol.Target:
    """The frozen target, behind the protocol (one cached Target per config, so jit caches stay warm)."""
    return protocol.as_target(self.target_cfg)

  @classmethod
  def of(cls, cfg: TrainConfig, target_cfg: LlamaConfig) -> "StepStatics":
    return cls(target_cfg=target_cfg, draft_cfg=draft_config(cfg, target_cfg), ttt_steps=cfg.ttt.steps,
               ttt_decay=cfg.ttt.decay, remat=cfg.ttt.remat, compute_dtype=cfg.compute_dtype,
               grad_accum=cfg.optim.grad_accum, online=cfg.features == "online", loss_norm=cfg.ttt.loss_norm)


def _teacher_inputs(target_params: Any, vocab: DraftVocab, batch: Batch, s: StepStatics, mesh: Mesh | None):
  """(aux, probs, in_vocab): the frozen target's view of the batch, online or from the stored features."""
  with jax.named_scope("target"):
    if s.online:
      aux, hidden = features.target_features(s.target, target_params, batch["tokens"], batch["lengths"])
      argmax = None
    else:
      aux, hidden = batch["aux"], batch["hidden"].astype(s.target.embed(target_params).dtype)
      argmax = batch["argmax"]
    probs, in_vocab = ttt.teacher(s.target, target_params, hidden, vocab, argmax_BT=argmax)
  # Pin the draft's inputs to the batch layout: left free, XLA may lay them out along the weights' fsdp axis.
  aux = sharding.constrain(aux, mesh, ("batch", "seq", None))
  probs = sharding.constrain(probs, mesh, ("batch", "seq", None))
  in_vocab = sharding.constrain(in_vocab, mesh, ("batch", "seq"))
  return jax.lax.stop_gradient(aux), probs, in_vocab


def _loss(params: Any, target_params: Any, vocab: DraftVocab, batch: Batch, s: StepStatics, mesh: Mesh | None, *,
          remat: bool):
  """(weighted TTT loss, metric sums) of one (micro-)batch; params are the fp32 master weights."""
  aux, probs, in_vocab = _teacher_inputs(target_params, vocab, batch, s, mesh)
  dtype = jnp.dtype(s.compute_dtype)
  # The cast sits inside the differentiated function, so gradients come back in fp32.
  p = jax.tree.map(lambda x: x.astype(dtype), params)
  embed_VD = s.target.embed(target_params).astype(dtype)
  loss, m = ttt.ttt_loss(p, embed_VD, aux, batch["tokens"], batch["loss_mask"], probs,
                         in_vocab, cfg=s.draft_cfg, steps=s.ttt_steps, decay=s.ttt_decay, remat=remat,
                         loss_norm=s.loss_norm)
  return loss, {"loss": loss, "loss_j": m["loss"], "ce_sum": m["ce_sum"], "correct": m["correct"],
                "weight_sum": m["weight_sum"], "mask_sum": m["mask_sum"], "tokens": jnp.sum(batch["lengths"])}


def _micro_grads(params: Any, target_params: Any, vocab: DraftVocab, batch: Batch, s: StepStatics,
                 mesh: Mesh | None):
  (_, sums), grads = jax.value_and_grad(_loss, has_aux=True)(params, target_params, vocab, batch, s, mesh,
                                                             remat=s.remat)
  return grads, sums


def _split_micro(x: jax.Array, n: int, mesh: Mesh | None, axes) -> jax.Array:
  """[B, ...] → [n, B/n, ...] with micro-batch m = rows m, n+m, 2n+m, ...: every device keeps its own rows."""
  y = jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
  return sharding.constrain(y, mesh, (None,) + axes)


def _finish_metrics(sums: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
  out = {"loss": sums["loss"] / n, "loss_j": sums["loss_j"] / n, "tokens": sums["tokens"],
         # Cross-entropy per counted position: comparable across batches with different numbers of assistant tokens.
         "ce_j": sums["ce_sum"] / jnp.maximum(sums["weight_sum"], 1.0),
         "acc_j": sums["correct"] / jnp.maximum(sums["weight_sum"], 1.0),
         # The official definition divides by every assistant position, out-of-draft-vocab targets included.
         "acc_official_j": sums["correct"] / jnp.maximum(sums["mask_sum"], 1.0)}
  return out


def train_step(state: TrainState, target_params: Any, vocab: DraftVocab, batch: Batch, stop_B: jax.Array, *,
               statics: StepStatics, tx: optax.GradientTransformation, mesh: Mesh | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step over the global batch (grad_accum micro-batches scanned). No host sync inside."""
  n = statics.grad_accum
  if n == 1:
    grads, sums = _micro_grads(state.params, target_params, vocab, batch, statics, mesh)
  else:
    micro = {k: _split_micro(v, n, mesh, BATCH_AXES[k]) for k, v in batch.items()}

    def body(acc, mb):
      g, s = _micro_grads(state.params, target_params, vocab, mb, statics, mesh)
      return jax.tree.map(jnp.add, acc, (g, s)), None

    zero = jax.eval_shape(lambda: _micro_grads(state.params, target_params, vocab,
                                               jax.tree.map(lambda v: v[0], micro), statics, mesh))
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero)
    (grads, sums), _ = jax.lax.scan(body, zero, micro)
    grads = jax.tree.map(lambda g: g / n, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = _finish_metrics(sums, n)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["stop"] = jnp.any(stop_B)
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_sums(params: Any, target_params: Any, vocab: DraftVocab, batch: Batch, *, statics: StepStatics,
              mesh: Mesh | None = None) -> dict[str, jax.Array]:
  """Metric sums of one held-out batch (sums, so batches combine exactly; finish_eval turns them into means)."""
  return _loss(params, target_params, vocab, batch, statics, mesh, remat=False)[1]


def finish_eval(sums: dict[str, np.ndarray], num_batches: int) -> dict[str, Any]:
  m = {k: np.asarray(v) for k, v in _finish_metrics(sums, num_batches).items()}
  m["tau"] = float(ttt.simulated_tau(m["acc_j"]))
  return m


def jit_train_step(statics: StepStatics, tx: optax.GradientTransformation, mesh: Mesh, state_sh: TrainState,
                   target_sh: Any, batch_sh: dict[str, NamedSharding]) -> Callable:
  """jax.jit of train_step with declared shardings; the state is donated, the target never is."""
  replicated = NamedSharding(mesh, P())
  vocab_sh = DraftVocab(d2t=replicated, t2d=replicated)
  stop_sh = batch_sh["lengths"]  # the stop flags are laid out like the rows they come with
  step = functools.partial(train_step, statics=statics, tx=tx, mesh=mesh)
  return jax.jit(step, in_shardings=(state_sh, target_sh, vocab_sh, batch_sh, stop_sh),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))


def jit_eval_step(statics: StepStatics, mesh: Mesh, params_sh: Any, target_sh: Any,
                  batch_sh: dict[str, NamedSharding]) -> Callable:
  replicated = NamedSharding(mesh, P())
  vocab_sh = DraftVocab(d2t=replicated, t2d=replicated)
  return jax.jit(functools.partial(eval_sums, statics=statics, mesh=mesh),
                 in_shardings=(params_sh, target_sh, vocab_sh, batch_sh), out_shardings=replicated)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The optimiser, the shardings and the jitted train / eval steps of one configuration."""

  tx: optax.GradientTransformation
  state_sh: TrainState
  target_sh: Any
  batch_sh: dict[str, NamedSharding]
  init: Callable  # key -> a fresh TrainState, created in its shardings
  train: Callable
  eval: Callable


@functools.lru_cache(maxsize=4)
def build_steps(statics: StepStatics, optim: OptimConfig, num_steps: int, mesh: Mesh, target_dtype: str,
                batch_shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> Steps:
  """Steps for a configuration, memoised on its (hashable) description: a second run in the same process (a
  resumed run, a test, a notebook) reuses the compiled executables instead of tracing new functions."""
  tx = make_optimizer(optim, num_steps)
  state_sh = state_shardings(mesh, statics.draft_cfg, tx)
  target_sh = target_shardings(mesh, statics.target_cfg, jnp.dtype(target_dtype))
  batch_sh = {k: sharding.named_sharding(mesh, BATCH_AXES[k], s) for k, s in batch_shapes}
  train = jit_train_step(statics, tx, mesh, state_sh, target_sh, batch_sh)
  # Held-out text always goes through the target, whatever the training features are.
  eval_sh = {k: v for k, v in batch_sh.items() if k in ("tokens", "loss_mask", "lengths")}
  evaluate = jit_eval_step(dataclasses.replace(statics, online=True), mesh, state_sh.params, target_sh, eval_sh)
  init = jax.jit(functools.partial(init_state, draft_cfg=statics.draft_cfg, tx=tx), out_shardings=state_sh)
  return Steps(tx=tx, state_sh=state_sh, target_sh=target_sh, batch_sh=batch_sh, init=init, train=train,
               eval=evaluate)
