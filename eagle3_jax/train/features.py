"""Target features for draft training: one function for the online step and the offline dumper, and a disk store."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from eagle3_jax.config import LlamaConfig
from eagle3_jax.interop import files
from eagle3_jax.target import protocol
from eagle3_jax.target.protocol import Target

FORMAT = "eagle3-jax-features/2"  # /2 adds the target's full-vocabulary argmax per token
INDEX = "index.json"
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def target_features(target: Target, target_params: Any, tokens_BT: jax.Array, lengths_B: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """(aux_BTA, final-normed hidden_BTD) of the frozen target on right-padded rows; no gradient flows back.

  Positions past lengths[b] hold values of no meaning (nothing valid can attend to them); the TTT loss never
  reads them as long as the loss mask is 0 there.
  """
  aux, hidden = target.hidden_states(target_params, tokens_BT, lengths_B)
  return jax.lax.stop_gradient(aux), jax.lax.stop_gradient(hidden)


def _dump_features(target_params: Any, tokens_BT: jax.Array, lengths_B: jax.Array, *, target: Target
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(aux, hidden, argmax): the argmax over the full vocabulary is stored so that offline steps never run the
  target's whole [D, V] head (at Vd = V/6 it would cost as much as the draft itself)."""
  from eagle3_jax.train import ttt  # deferred: ttt imports the draft

  aux, hidden = target_features(target, target_params, tokens_BT, lengths_B)
  return aux, hidden, ttt.full_argmax(target, target_params, hidden)


_target_features_jit = jax.jit(_dump_features, static_argnames="target")


def target_fingerprint(target_params: Any, target_cfg: LlamaConfig) -> str:
  """Short hash of the target config and a corner of every weight, rounded to bf16 so that bf16 and fp32
  loads of the same checkpoint agree while different checkpoints (or random inits) do not."""
  h = hashlib.sha256(json.dumps(dataclasses.asdict(target_cfg), sort_keys=True).encode())
  for path, x in sorted(jax.tree_util.tree_leaves_with_path(target_params), key=lambda kv: jax.tree_util.keystr(kv[0])):
    corner = np.asarray(x[tuple(slice(0, 4) for _ in range(x.ndim))].astype(jnp.bfloat16).astype(jnp.float32))
    h.update(jax.tree_util.keystr(path).encode() + str(x.shape).encode() + corner.tobytes())
  return h.hexdigest()[:16]


def _check(index: dict, field: str, expected: Any, path: pathlib.Path) -> None:
  if index.get(field) != expected:
    raise ValueError(f"feature store {path} was built with {field}={index.get(field)!r}, but this run has "
                     f"{field}={expected!r}; rebuild the store (or point to the right one)")


class FeatureWriter:
  """Appends examples (valid tokens only, no padding) to shards of `examples_per_shard` safetensors files.

  Each shard holds aux [N,A], hidden [N,D], tokens [N] int32, loss_mask [N] uint8, argmax [N] int32 (the
  target's full-vocabulary argmax at each position) over the N tokens of its
  examples, plus offsets [n+1]; the index is rewritten atomically after every shard, so a killed dump leaves a
  consistent store that `resume=True` continues.
  """

  def __init__(self, path: str | os.PathLike, *, target_cfg: LlamaConfig, fingerprint: str, target_name: str,
               dataset: str, seq_len: int, dtype: str = "bfloat16", examples_per_shard: int = 1024,
               resume: bool = False):
    if dtype not in _DTYPES:
      raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    self.path = pathlib.Path(path)
    self.path.mkdir(parents=True, exist_ok=True)
    self.examples_per_shard = examples_per_shard
    header = {"format": FORMAT, "target": target_name, "target_fingerprint": fingerprint,
              "target_config": json.loads(json.dumps(dataclasses.asdict(target_cfg))),
              "aux_layers": list(target_cfg.aux_layer_ids), "hidden_size": target_cfg.hidden_size,
              "aux_size": target_cfg.hidden_size * len(target_cfg.aux_layer_ids), "dataset": dataset,
              "seq_len": seq_len, "dtype": dtype}
    existing = self.path / INDEX
    if existing.exists():
      old = json.loads(existing.read_text())
      for field, value in header.items():
        if field != "target":
          _check(old, field, value, self.path)
      if old["num_examples"] and not resume:
        raise ValueError(f"feature store {self.path} already holds {old['num_examples']} examples; "
                         "pass resume=True to continue it or choose an empty directory")
      self.index = old
    else:
      self.index = header | {"num_examples": 0, "num_tokens": 0, "shards": []}
    self._pending: list[tuple[np.ndarray, ...]] = []

  @property
  def num_examples(self) -> int:
    return self.index["num_examples"] + len(self._pending)

  def add(self, tokens_T: Any, loss_mask_T: Any, aux_TA: Any, hidden_TD: Any, argmax_T: Any) -> None:
    """One example, already cut to its valid length."""
    dt = _DTYPES[self.index["dtype"]]
    self._pending.append((np.asarray(tokens_T, np.int32), np.asarray(loss_mask_T, np.uint8),
                          np.asarray(aux_TA).astype(dt), np.asarray(hidden_TD).astype(dt),
                          np.asarray(argmax_T, np.int32)))
    if len(self._pending) >= self.examples_per_shard:
      self.flush()

  def add_batch(self, batch: dict, aux_BTA: Any, hidden_BTD: Any, argmax_BT: Any, skip: int = 0) -> None:
    """The rows of a {tokens, loss_mask, lengths} batch with their features, from row `skip` on."""
    aux, hidden, argmax = np.asarray(aux_BTA), np.asarray(hidden_BTD), np.asarray(argmax_BT)
    for b, n in enumerate(np.asarray(batch["lengths"])[skip:], start=skip):
      self.add(np.asarray(batch["tokens"])[b, :n], np.asarray(batch["loss_mask"])[b, :n], aux[b, :n],
               hidden[b, :n], argmax[b, :n])

  def flush(self) -> None:
    if not self._pending:
      return
    tokens, loss_mask, aux, hidden, argmax = (np.concatenate(x) for x in zip(*self._pending))
    offsets = np.cumsum([0] + [len(p[0]) for p in self._pending]).astype(np.int64)
    name = f"shard-{len(self.index['shards']):05d}.safetensors"
    tensors = {"tokens": tokens, "loss_mask": loss_mask, "aux": aux, "hidden": hidden, "argmax": argmax,
               "offsets": offsets}
    files.atomic_write(self.path / name, lambda p: safetensors.numpy.save_file(tensors, str(p)))
    self.index["shards"].append({"file": name, "num_examples": len(self._pending), "num_tokens": len(tokens)})
    self.index["num_examples"] += len(self._pending)
    self.index["num_tokens"] += len(tokens)
    self._pending = []
    files.atomic_write(self.path / INDEX, lambda p: p.write_text(json.dumps(self.index, indent=1)))

  def close(self) -> dict:
    self.flush()
    files.atomic_write(self.path / INDEX, lambda p: p.write_text(json.dumps(self.index, indent=1)))
    return self.index


def dump_features(path: str | os.PathLike, batches: Iterable[dict], target_params: Any, *,
                  target_cfg: LlamaConfig, target_name: str, dataset: str, dtype: str = "bfloat16",
                  examples_per_shard: int = 1024, resume: bool = False, seq_len: int | None = None,
                  total: int | None = None, progress: bool = False, target: Target | None = None) -> dict:
  """Runs target_features over {tokens [B,T], loss_mask [B,T], lengths [B]} batches and stores the result.

  Batches may come in several lengths T <= seq_len (default: the first batch's T), e.g. length buckets, so the
  target never runs over padding it does not need. With resume=True the examples already in the store are
  skipped (the batches must come in the same order). The index is marked complete at the end. Returns it.
  `progress` shows a bar on stderr over examples (of `total`, if known) with the target's tokens/s.
  """
  from tqdm import tqdm

  # target_cfg describes the target in the store's index (its fingerprint); the forward pass goes through `target`.
  target = protocol.as_target(target_cfg) if target is None else target
  writer = None
  seen = 0
  bar = tqdm(total=total, desc="feature dump", unit="ex", file=sys.stderr, disable=not progress)
  t0, tokens = time.perf_counter(), 0
  for batch in batches:
    T = np.shape(batch["tokens"])[1]
    if writer is None:
      writer = FeatureWriter(path, target_cfg=target_cfg, fingerprint=target_fingerprint(target_params, target_cfg),
                             target_name=target_name, dataset=dataset, seq_len=seq_len or T, dtype=dtype,
                             examples_per_shard=examples_per_shard, resume=resume)
      done = writer.num_examples
    if T > writer.index["seq_len"]:
      raise ValueError(f"batch tokens have length {T}, more than the store's seq_len {writer.index['seq_len']}")
    B = np.shape(batch["tokens"])[0]
    if seen + B > done:
      feats = _target_features_jit(target_params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["lengths"]),
                                   target=target)
      writer.add_batch(batch, *feats, skip=max(done - seen, 0))
      tokens += int(np.sum(batch["lengths"]))
      bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
    seen += B
    bar.update(B)
  bar.close()
  if writer is None:
    raise ValueError("dump_features got no batches")
  writer.index["complete"] = True
  return writer.close()


class FeatureStore:
  """Random-access reader (len / getitem, so grain can shuffle it) yielding the online batch layout.

  Refuses a store built for another target (config, weights fingerprint) or other aux layers when told which
  target this run uses.
  """

  def __init__(self, path: str | os.PathLike, *, target_cfg: LlamaConfig | None = None,
               target_params: Any = None, dataset: str | None = None, seq_len: int | None = None):
    self.path = pathlib.Path(path)
    if not (self.path / INDEX).exists():
      raise FileNotFoundError(f"no feature store at {self.path} ({INDEX} missing)")
    self.index = json.loads((self.path / INDEX).read_text())
    _check(self.index, "format", FORMAT, self.path)
    if target_cfg is not None:
      _check(self.index, "aux_layers", list(target_cfg.aux_layer_ids), self.path)
      _check(self.index, "target_config", json.loads(json.dumps(dataclasses.asdict(target_cfg))), self.path)
      if target_params is not None:
        _check(self.index, "target_fingerprint", target_fingerprint(target_params, target_cfg), self.path)
    if dataset is not None:
      _check(self.index, "dataset", dataset, self.path)
    if seq_len is not None:
      _check(self.index, "seq_len", seq_len, self.path)
    counts = [s["num_examples"] for s in self.index["shards"]]
    self._starts = np.cumsum([0] + counts)
    self._files: dict[int, Any] = {}

  @property
  def seq_len(self) -> int:
    return self.index["seq_len"]

  def __getstate__(self) -> dict:
    # Open safetensors handles do not pickle; grain worker processes reopen shards lazily.
    return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _shard(self, s: int):
    if s not in self._files:
      self._files[s] = safe_open(str(self.path / self.index["shards"][s]["file"]), "numpy")
    return self._files[s]

  def lengths(self) -> np.ndarray:
    """int64[N] token count of every example (from the shards' offsets; nothing else is read)."""
    return np.concatenate([np.diff(self._shard(s).get_tensor("offsets")) for s in range(len(self.index["shards"]))])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    """One example right-padded to seq_len: tokens, loss_mask, lengths (scalar), aux, hidden, argmax."""
    return self.example(i, self.seq_len)

  def example(self, i: int, T: int) -> dict[str, np.ndarray]:
    """One example right-padded to T (at least its length)."""
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} outside [0, {len(self)})")
    s = int(np.searchsorted(self._starts, i, side="right")) - 1
    f = self._shard(s)
    lo, hi = (int(x) for x in f.get_slice("offsets")[i - self._starts[s]:i - self._starts[s] + 2])
    n = hi - lo
    if n > T:
      raise ValueError(f"example {i} has {n} tokens, more than T={T}")
    out = {"lengths": np.int32(n)}
    for name, dtype in (("tokens", np.int32), ("loss_mask", np.int32), ("aux", None), ("hidden", None),
                        ("argmax", np.int32)):
      x = f.get_slice(name)[lo:hi]
      x = x.astype(dtype) if dtype else x
      out[name] = np.pad(x, [(0, T - n)] + [(0, 0)] * (x.ndim - 1))
    return out

  def batches(self, batch_size: int, *, seed: int | None = None, drop_remainder: bool = True
              ) -> Iterator[dict[str, np.ndarray]]:
    """Batches {tokens [B,T], loss_mask [B,T], lengths [B], aux [B,T,A], hidden [B,T,D]}, in order or shuffled."""
    order = np.arange(len(self)) if seed is None else np.random.default_rng(seed).permutation(len(self))
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    for b in range(0, stop, batch_size):
      rows = [self[int(i)] for i in order[b:b + batch_size]]
      yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def bucket_lengths(seq_len: int, minimum: int = 64) -> tuple[int, ...]:
  """2^k and 3·2^(k-1) lengths from `minimum` up to seq_len (seq_len itself last): at most 1/3 padding per row."""
  out, k = [], max(minimum, 1)
  while k < seq_len:
    out.append(k)
    k = k * 3 // 2 if k & (k - 1) == 0 else k * 4 // 3  # 64 -> 96 -> 128 -> 192 -> ...
  return tuple(out) + (seq_len,)


class BucketedBatches:
  """Offline training batches of B examples of similar length, each padded only to its length bucket.

  Every epoch shuffles the examples (seed, epoch), sorts each window of `window` batches by length, cuts it into
  batches and shuffles the batch order, so a batch mixes no short and long rows yet the order stays random. The
  padded positions would cost as much draft compute as real ones: at seq_len 1024 with rows of ~350 tokens that
  is most of a step. One compile per bucket (a handful), never per step. Checkpointable: get_state/set_state
  hold (epoch, batch); process p of P takes batches p, p+P, ... of the same global plan.
  """

  def __init__(self, store: FeatureStore, batch_size: int, *, seed: int = 0, window: int = 32,
               min_bucket: int = 64, shard_index: int = 0, shard_count: int = 1):
    self.store, self.B, self.seed, self.window = store, batch_size, seed, window
    self.shard_index, self.shard_count = shard_index, shard_count
    self.lengths = store.lengths()
    if len(self.lengths) < batch_size * shard_count:
      raise ValueError(f"feature store {store.path} holds {len(self.lengths)} examples, fewer than one global batch "
                       f"({batch_size} x {shard_count} processes)")
    self.buckets = np.asarray(bucket_lengths(store.seq_len, min(min_bucket, store.seq_len)))
    self.epoch, self.batch = 0, 0
    self._plan_epoch, self._plan = None, None

  def _batches(self, epoch: int) -> list[np.ndarray]:
    if self._plan_epoch != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      order = rng.permutation(len(self.lengths))
      order = order[:len(order) - len(order) % self.B]
      per = self.window * self.B
      batches = []
      for w in range(0, len(order), per):
        win = order[w:w + per]
        win = win[np.argsort(self.lengths[win], kind="stable")]
        batches += [win[b:b + self.B] for b in range(0, len(win), self.B)]
      batches = [batches[i] for i in rng.permutation(len(batches))]
      n = len(batches) - len(batches) % self.shard_count
      self._plan_epoch, self._plan = epoch, batches[self.shard_index:n:self.shard_count]
    return self._plan

  def __iter__(self) -> "BucketedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    plan = self._batches(self.epoch)
    if self.batch >= len(plan):
      self.epoch, self.batch = self.epoch + 1, 0
      plan = self._batches(self.epoch)
    idx = plan[self.batch]
    self.batch += 1
    T = int(self.buckets[np.searchsorted(self.buckets, self.lengths[idx].max())])
    rows = [self.store.example(int(i), T) for i in idx]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def start_prefetch(self) -> None:
    """Grain's checkpoint handler calls this after a restore; batches are read on demand, nothing to start."""

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "examples": int(len(self.lengths))}

  def set_state(self, state: dict[str, int] | bytes) -> None:
    state = json.loads(state) if isinstance(state, (bytes, str)) else state  # grain hands back the saved bytes
    if state.get("examples") != len(self.lengths) or state.get("seed") != self.seed:
      raise ValueError(f"the checkpoint's data position is for a feature store of {state.get('examples')} examples "
                       f"and seed {state.get('seed')}; this one has {len(self.lengths)} and seed {self.seed}")
    self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
