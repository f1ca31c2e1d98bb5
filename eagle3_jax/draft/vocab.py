"""The one draft-vocabulary type (DraftVocab: d2t/t2d, a pytree for jit) and its construction with provenance.

A draft vocabulary is the Vd target tokens most often at loss-masked training positions. As in the official
`scandata` (reference a.3): count target ids where loss_mask == 1, keep the Vd most frequent, sort them ascending;
draft index i stands for target id ``i + d2t[i]`` and ``t2d[v]`` marks the kept ids. Unlike it, ties are broken by
the lower id (deterministic), a dataset with fewer than Vd distinct masked tokens is filled up with the lowest
unseen ids (so d2t always has Vd entries; the file records how many were filled), and a stored vocabulary is only
reused for the same dataset, tokenizer, V and Vd (a mismatch raises, never silently).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from eagle3_jax.config import DataConfig

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DraftVocab:
  """Draft index i stands for target id i + d2t[i]; t2d[v] marks the target ids the draft vocabulary keeps.

  d2t int[Vd] and t2d bool[V] are its pytree leaves: jax int32 buffers for decoding and training (`from_ids`),
  numpy int64 when counted from data or read from a file. A vocabulary counted from data also carries its
  masked-token counts int64[V] and its provenance (JSON-able dict). Those are host-side records, not leaves:
  flattening drops them, so any vocabulary enters jit, tree maps and sharding trees as the same two arrays.
  """

  d2t: Any  # int[Vd]
  t2d: Any  # bool[V]
  counts: np.ndarray | None = None  # int64[V] masked-token count of each target id (None: not counted here)
  provenance: dict[str, Any] | None = None  # what it was counted from (vocab_provenance), for checks on reuse

  @classmethod
  def identity(cls, vocab_size: int) -> DraftVocab:
    return cls(d2t=jnp.zeros((vocab_size,), jnp.int32), t2d=jnp.ones((vocab_size,), bool))

  @classmethod
  def from_ids(cls, ids_Vd: np.ndarray, vocab_size: int) -> DraftVocab:
    """Device buffers (int32 d2t) from the sorted target ids kept in the draft vocabulary."""
    ids = np.asarray(ids_Vd, np.int64)
    if np.any(np.diff(ids) <= 0) or ids.min() < 0 or ids.max() >= vocab_size:
      raise ValueError("draft vocabulary ids must be strictly ascending target ids in [0, vocab_size)")
    d2t, t2d = _tables(ids, vocab_size)
    return cls(d2t=jnp.asarray(d2t, jnp.int32), t2d=jnp.asarray(t2d))

  def to_target(self, draft_ids: jax.Array) -> jax.Array:
    return draft_ids + self.d2t[draft_ids]

  def target_ids(self) -> Any:
    """[Vd] target id of every draft index, ascending, in d2t's kind and dtype (numpy int64 on the host)."""
    xp = np if isinstance(self.d2t, np.ndarray) else jnp
    return xp.arange(self.d2t.shape[0], dtype=self.d2t.dtype) + self.d2t

  @property
  def vocab_size(self) -> int:
    return self.t2d.shape[0]

  @property
  def draft_vocab_size(self) -> int:
    return self.d2t.shape[0]


jax.tree_util.register_pytree_with_keys(
    DraftVocab,
    lambda v: (((jax.tree_util.GetAttrKey("d2t"), v.d2t), (jax.tree_util.GetAttrKey("t2d"), v.t2d)), None),
    lambda _, leaves: DraftVocab(*leaves),
    flatten_func=lambda v: ((v.d2t, v.t2d), None))


def _tables(ids_Vd: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(d2t int64[Vd], t2d bool[V]) of strictly ascending target ids."""
  t2d = np.zeros((vocab_size,), bool)
  t2d[ids_Vd] = True
  return ids_Vd - np.arange(len(ids_Vd), dtype=np.int64), t2d


def count_tokens(examples: Iterable[tuple[np.ndarray, np.ndarray]], vocab_size: int) -> tuple[np.ndarray, int]:
  """(int64[V] count of each target id at positions with loss_mask == 1, number of examples)."""
  counts, n = np.zeros((vocab_size,), np.int64), 0
  for tokens, mask in examples:
    ids = np.asarray(tokens)[np.asarray(mask) == 1]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
      raise ValueError(f"token id {int(ids.max())} is outside the target vocabulary of size {vocab_size}")
    counts += np.bincount(ids, minlength=vocab_size)
    n += 1
  return counts, n


def vocab_from_counts(counts: np.ndarray, draft_vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(d2t int64[Vd], t2d bool[V]) keeping the Vd ids with the highest counts, ties and fill by lower id."""
  counts = np.asarray(counts)
  V, Vd = len(counts), draft_vocab_size
  if not 1 <= Vd <= V:
    raise ValueError(f"draft_vocab_size={Vd} must be in [1, vocab_size={V}]")
  order = np.lexsort((np.arange(V), -counts))  # last key is primary: count descending, then id ascending
  return _tables(np.sort(order[:Vd]).astype(np.int64), V)


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
  """Identity of a tokenizer: its size, a hash of its token→id table and of its chat template."""
  table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
  template = getattr(tokenizer, "chat_template", None) or ""
  return {"size": len(tokenizer), "vocab_sha256": hashlib.sha256(table).hexdigest(),
          "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()}


def vocab_provenance(cfg: DataConfig, tokenizer, draft_vocab_size: int, *, vocab_size: int | None = None,
                     max_examples: int | None = None) -> dict[str, Any]:
  """What a stored vocabulary must match to be reused (pass it as `load_vocab(..., expect=...)`)."""
  from eagle3_jax.train import data  # deferred, as below: decoding imports this module, never the data pipeline

  return {"format": FORMAT_VERSION, "dataset": data.dataset_fingerprint(cfg),
          "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": vocab_size or len(tokenizer),
          "draft_vocab_size": draft_vocab_size, "max_examples": max_examples}


def build_vocab(cfg: DataConfig, tokenizer, draft_vocab_size: int, *, vocab_size: int | None = None,
                max_examples: int | None = None) -> DraftVocab:
  """Counts the training split (the first `max_examples` usable rows, file order) and keeps the top Vd.

  `vocab_size` is the target model's V (its embedding rows; may exceed len(tokenizer)).
  """
  from eagle3_jax.train import data

  expect = vocab_provenance(cfg, tokenizer, draft_vocab_size, vocab_size=vocab_size, max_examples=max_examples)
  V = expect["vocab_size"]
  stats = data.DataStats()
  counts, n = count_tokens(data.iterate_examples(cfg, tokenizer, limit=max_examples, stats=stats), V)
  d2t, t2d = vocab_from_counts(counts, draft_vocab_size)
  total, distinct = int(counts.sum()), int((counts > 0).sum())
  coverage = float(counts[t2d].sum() / total)
  if distinct < draft_vocab_size:
    log.warning("only %d distinct masked tokens for a draft vocabulary of %d: filled with %d unseen ids",
                distinct, draft_vocab_size, draft_vocab_size - distinct)
  log.info("draft vocabulary: %d of %d ids cover %.4f of %d masked tokens in %d examples", draft_vocab_size, V,
           coverage, total, n)
  provenance = expect | {"tokenizer_name": str(getattr(tokenizer, "name_or_path", "")), "examples": n,
                         "masked_tokens": total, "distinct": distinct,
                         "filled": max(0, draft_vocab_size - distinct), "coverage": coverage,
                         "data_stats": stats.as_dict()}
  return DraftVocab(d2t=d2t, t2d=t2d, counts=counts, provenance=provenance)


def save_vocab(path: str | os.PathLike, vocab: DraftVocab) -> None:
  """One safetensors file: d2t, t2d, counts, and the provenance JSON in its metadata."""
  from safetensors.numpy import save_file

  from eagle3_jax.interop import files  # deferred: interop reads drafts, whose vocabulary is this module's type

  tensors = {"d2t": vocab.d2t.astype(np.int64), "t2d": vocab.t2d.astype(bool), "counts": vocab.counts}
  # Atomic: a crash never leaves a half-written vocabulary that a later run would trust.
  metadata = {"provenance": json.dumps(vocab.provenance)}
  files.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _mismatches(stored: Any, expected: Any, key: str = "") -> list[str]:
  if isinstance(expected, Mapping):
    stored = stored if isinstance(stored, Mapping) else {}
    return [m for k in expected for m in _mismatches(stored.get(k), expected[k], f"{key}.{k}" if key else k)]
  return [] if stored == expected else [f"{key}: stored {stored!r}, expected {expected!r}"]


def load_vocab(path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> DraftVocab:
  """Reads a saved vocabulary; raises ValueError if its provenance differs from `expect` on any given key."""
  from eagle3_jax.interop import files

  arrays, metadata = files.read_safetensors(path)
  provenance = json.loads(metadata.get("provenance", "null"))
  if not isinstance(provenance, dict):
    raise ValueError(f"{path}: no draft-vocabulary provenance in the file")
  if expect is not None:
    wrong = _mismatches(provenance, json.loads(json.dumps(expect)))  # JSON round trip: tuples become lists
    if wrong:
      raise ValueError(f"{path} was built for another dataset or tokenizer ({'; '.join(wrong)}); "
                       "delete it or choose another path to rebuild it")
  vocab = DraftVocab(d2t=arrays["d2t"], t2d=arrays["t2d"], counts=arrays["counts"], provenance=provenance)
  if vocab.t2d.sum() != vocab.draft_vocab_size or not np.array_equal(np.flatnonzero(vocab.t2d), vocab.target_ids()):
    raise ValueError(f"{path}: d2t and t2d disagree")
  return vocab


def load_or_build_vocab(path: str | os.PathLike, cfg: DataConfig, tokenizer, draft_vocab_size: int, *,
                        vocab_size: int | None = None, max_examples: int | None = None) -> DraftVocab:
  """Loads `path` if it exists (checked against this dataset and tokenizer), else builds and saves it."""
  expect = vocab_provenance(cfg, tokenizer, draft_vocab_size, vocab_size=vocab_size, max_examples=max_examples)
  if os.path.exists(path):
    return load_vocab(path, expect=expect)
  vocab = build_vocab(cfg, tokenizer, draft_vocab_size, vocab_size=vocab_size, max_examples=max_examples)
  save_vocab(path, vocab)
  return vocab
