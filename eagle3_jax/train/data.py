"""Conversations (ShareGPT / messages files) → chat-template tokens, assistant-only loss mask → grain batches.

Batches are dicts of numpy arrays with static shapes: ``tokens`` int32[B, T] (right-padded with the pad id),
``loss_mask`` int32[B, T] and ``lengths`` int32[B] (0 for a padding row). ``loss_mask[b, t] == 1`` iff
``tokens[b, t]`` is a token the assistant generated: its content tokens and the template's end-of-turn token
(``<|eot_id|>``, ``<|im_end|>``, ...), so the draft learns to predict the turn end. What the template adds around a
turn (headers, the newline after ``<|im_end|>``), user and system tokens and padding have mask 0. The mask sits on
the token itself: a trainer that predicts token t from position t-1 shifts it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

log = logging.getLogger(__name__)

from eagle3_jax.config import DataConfig
from eagle3_jax.train.chat import EMPTY, MALFORMED, TOO_LONG, TRUNCATED, ChatEncoder
from eagle3_jax.train.sources import Rows, load_rows, resolve_source


def split_rows(cfg: DataConfig, split: str) -> Rows:
  """The deterministic train or eval rows of `cfg` (eval never depends on the shuffle seed)."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  if cfg.eval_source:
    return load_rows(cfg.source if split == "train" else cfg.eval_source, max_rows=cfg.max_rows,
                     cache_dir=cfg.cache_dir)
  rows = load_rows(cfg.source, max_rows=cfg.max_rows, cache_dir=cfg.cache_dir)
  if not cfg.eval_fraction:
    if split == "eval":
      raise ValueError("no eval split: set DataConfig.eval_fraction or DataConfig.eval_source")
    return rows
  held = eval_indices(len(rows), cfg)
  return rows.subset(held if split == "eval" else np.setdiff1d(np.arange(len(rows)), held))


def eval_indices(n_rows: int, cfg: DataConfig) -> np.ndarray:
  """Sorted indices of the rows `eval_fraction` holds out of n_rows (by `split_seed`, never by `seed`)."""
  n_eval = max(1, round(n_rows * cfg.eval_fraction))
  if n_eval >= n_rows:
    raise ValueError(f"eval_fraction={cfg.eval_fraction} leaves no training rows in {cfg.source!r}")
  return np.sort(np.random.default_rng(cfg.split_seed).permutation(n_rows)[:n_eval])


def dataset_fingerprint(cfg: DataConfig) -> dict[str, Any]:
  """What determines the tokens and masks of the training split (for the draft-vocab provenance)."""
  files = [[os.path.basename(p), os.path.getsize(p)] for p in resolve_source(cfg.source)]
  keys = ("source", "eval_fraction", "split_seed", "max_rows", "max_length", "overflow", "system_prompt")
  return {"files": files, **{k: getattr(cfg, k) for k in keys}}


# ------------------------------------------------------------------------------------------------ batching

@dataclasses.dataclass
class DataStats:
  """Counters of one process's stream (part of the iterator state, so they survive a restore)."""

  rows_seen: int = 0
  used: int = 0  # rows that went into batches (truncated ones included)
  malformed: int = 0
  truncated: int = 0
  dropped: int = 0  # longer than max_length with overflow="drop", or no assistant token left after truncation
  tokens: int = 0
  loss_tokens: int = 0
  reasons: dict[str, int] = dataclasses.field(default_factory=dict)  # malformed rows by cause

  def record(self, element: dict[str, Any]) -> bool:
    """Counts one encoded row; True if it is usable."""
    self.rows_seen += 1
    status = element["status"]
    if status == MALFORMED:
      self.malformed += 1
      self.reasons[element["reason"]] = self.reasons.get(element["reason"], 0) + 1
      return False
    if status in (TOO_LONG, EMPTY):
      self.dropped += 1
      return False
    self.used += 1
    self.truncated += status == TRUNCATED
    self.tokens += len(element["tokens"])
    self.loss_tokens += int(element["loss_mask"].sum())
    return True

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class _PadBatchDataset(grain.IterDataset):
  """Counts encoded rows, skips unusable ones and stacks the rest into right-padded [B, T] batches.

  Replaces grain's filter + batch so every skipped row is counted, and so a stream with no usable row stops with
  a clear error instead of spinning forever on a repeated dataset.
  """

  def __init__(self, parent, *, batch_size, max_length, pad_id, num_batches, rows_per_epoch, name):
    super().__init__(parent)
    self.kw = dict(batch_size=batch_size, max_length=max_length, pad_id=pad_id, num_batches=num_batches,
                   rows_per_epoch=rows_per_epoch, name=name)

  def __iter__(self) -> BatchIterator:
    return self.batch_iterator()

  def batch_iterator(self) -> BatchIterator:
    # Bypasses the thread-prefetch wrapper grain's __iter__ may add at the pipeline end, which would hide
    # `stats` and run one batch ahead of them; the tokenising stage below is threaded already.
    return BatchIterator(self._parent.__iter__(), **self.kw)


class BatchIterator(grain.DatasetIterator):
  """Yields {tokens, loss_mask, lengths}; `stats` has the counters; get_state/set_state resume exactly.

  With `num_batches` (eval) it yields exactly that many batches, the last ones padded with empty rows (lengths 0),
  so that every process runs the same number of eval steps; without it a final partial batch is dropped.
  """

  def __init__(self, parent, *, batch_size, max_length, pad_id, num_batches, rows_per_epoch, name):
    super().__init__(parent)
    self.batch_size, self.max_length, self.pad_id = batch_size, max_length, pad_id
    self.num_batches, self.rows_per_epoch, self.name = num_batches, rows_per_epoch, name
    self.stats, self.batches = DataStats(), 0

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self.batches >= self.num_batches:
      raise StopIteration
    rows = []
    while len(rows) < self.batch_size:
      if self.rows_per_epoch is not None and self.stats.used == 0 and self.stats.rows_seen >= self.rows_per_epoch:
        self._raise_unusable()
      try:
        element = next(self._parent)
      except StopIteration:
        break
      if self.stats.record(element):
        rows.append(element)
    if self.num_batches is None and len(rows) < self.batch_size:
      raise StopIteration
    self.batches += 1
    B, T = self.batch_size, self.max_length
    batch = {"tokens": np.full((B, T), self.pad_id, np.int32), "loss_mask": np.zeros((B, T), np.int32),
             "lengths": np.zeros((B,), np.int32)}
    for b, row in enumerate(rows):
      n = len(row["tokens"])
      batch["tokens"][b, :n], batch["loss_mask"][b, :n], batch["lengths"][b] = row["tokens"], row["loss_mask"], n
    return batch

  def _raise_unusable(self):
    s = self.stats
    raise ValueError(f"data source {self.name!r} has no usable row: {s.rows_seen} read, {s.malformed} malformed "
                     f"{s.reasons}, {s.dropped} dropped as too long or without assistant tokens")

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "stats": self.stats.as_dict(), "batches": self.batches}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.stats = DataStats(**{**state["stats"], "reasons": dict(state["stats"]["reasons"])})
    self.batches = state["batches"]


def _default_shard(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    import jax  # deferred: the data pipeline itself does not need an accelerator

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is outside [0, shard_count={shard_count})")
  return shard_index, shard_count


def make_dataset(cfg: DataConfig, tokenizer, *, split: str = "train", shard_index: int | None = None,
                 shard_count: int | None = None) -> _PadBatchDataset:
  """rows → shuffle(seed, per epoch) → repeat → this process's rows → tokenise (lazily, threaded) → [B, T].

  Sharding happens on rows, before tokenising: each process tokenises only its own rows, and the global order
  is the same for any process count (process p takes rows p, p+P, p+2P, ... of the shuffled stream). The eval
  split is read once, unshuffled, in `num_eval_batches` batches on every process (padded with empty rows).
  """
  shard_index, shard_count = _default_shard(shard_index, shard_count)
  rows = split_rows(cfg, split)
  if split == "train" and len(rows) < shard_count:
    raise ValueError(f"{split} split of {rows.name!r} has {len(rows)} rows for {shard_count} processes")
  # An eval shard without usable rows is fine (its batches are padding) unless it is the whole split.
  rows_per_epoch = math.ceil((len(rows) - shard_index) / shard_count)
  if split == "eval" and shard_count > 1:
    rows_per_epoch = None
  ds = grain.MapDataset.source(rows)
  if split == "train":
    ds = ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
  ds = ds[shard_index::shard_count]
  encoder = ChatEncoder(tokenizer, max_length=cfg.max_length, overflow=cfg.overflow,
                        system_prompt=cfg.system_prompt)
  ds = ds.map(encoder).to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                         prefetch_buffer_size=cfg.prefetch_buffer_size))
  pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
  return _PadBatchDataset(ds, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=pad_id,
                          num_batches=num_eval_batches(cfg, shard_count) if split == "eval" else None,
                          rows_per_epoch=rows_per_epoch, name=rows.name)


def num_eval_batches(cfg: DataConfig, shard_count: int | None = None) -> int:
  """Batches of the eval split per process: the same on every process (the largest shard, unfiltered)."""
  shard_count = _default_shard(0, shard_count)[1]
  return math.ceil(math.ceil(len(split_rows(cfg, "eval")) / shard_count) / cfg.batch_size)


def make_iterator(cfg: DataConfig, tokenizer, *, split: str = "train", shard_index: int | None = None,
                  shard_count: int | None = None) -> BatchIterator:
  """The checkpointable batch iterator of `make_dataset` (`.stats`, `.get_state()`, `.set_state()`)."""
  return make_dataset(cfg, tokenizer, split=split, shard_index=shard_index,
                      shard_count=shard_count).batch_iterator()


def iterate_examples(cfg: DataConfig, tokenizer, *, split: str = "train", limit: int | None = None,
                     stats: DataStats | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(tokens, loss_mask) of the usable rows of a split in file order, unpadded, for at most `limit` rows.

  Every row is tokenised exactly as `make_dataset` does (same template, mask and overflow rule); `stats`, if
  given, is filled as the stream goes. Raises ValueError if the split yields no usable row.
  """
  rows = split_rows(cfg, split)
  encoder = ChatEncoder(tokenizer, max_length=cfg.max_length, overflow=cfg.overflow,
                        system_prompt=cfg.system_prompt)
  stats = DataStats() if stats is None else stats
  ds = grain.MapDataset.source(rows).map(encoder).to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size))
  start = stats.used
  for element in ds:
    if limit is not None and stats.used - start >= limit:
      return
    if stats.record(element):
      yield element["tokens"], element["loss_mask"]
  if stats.used == start:
    raise ValueError(f"data source {rows.name!r} has no usable row: {stats.rows_seen} read, {stats.malformed} "
                     f"malformed {stats.reasons}, {stats.dropped} dropped")
