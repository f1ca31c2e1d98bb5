"""Draft vocabulary: frequency selection, d2t/t2d invariants, fill rule, provenance checks on reuse."""

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.train import data
from eagle3_jax.draft import vocab
from test_data import MESSAGES, make_tokenizer


def draft_to_target(ids, d2t):
  """Target ids of draft indices (numpy or jax arrays of any shape): ``ids + d2t[ids]``."""
  return ids + d2t[ids]


def target_to_draft(ids, t2d):
  """Draft indices of target ids, -1 where an id is outside the draft vocabulary (numpy or jax arrays)."""
  inside = t2d[ids].astype(np.int32)  # int32: jax without x64 would warn on int64
  return (t2d.cumsum() - 1)[ids] * inside + inside - 1

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


def _cfg(tmp_path, **kw):
  return data.DataConfig(**({"source": MESSAGES, "max_length": 160, "num_threads": 2, "cache_dir": str(tmp_path)}
                            | kw))


def check_invariants(d2t, t2d):
  ids = np.arange(len(d2t)) + d2t
  assert t2d.dtype == bool and t2d.sum() == len(d2t)
  assert np.all(np.diff(ids) > 0) and np.all(t2d[ids]) and np.array_equal(np.flatnonzero(t2d), ids)


def test_vocab_from_counts_keeps_most_frequent_sorted():
  counts = np.array([0, 5, 1, 9, 0, 5, 2, 0])
  d2t, t2d = vocab.vocab_from_counts(counts, 4)
  check_invariants(d2t, t2d)
  assert list(np.arange(4) + d2t) == [1, 3, 5, 6]  # 9, 5, 5, 2
  d2t, _ = vocab.vocab_from_counts(counts, 2)
  assert list(np.arange(2) + d2t) == [1, 3]  # tie between ids 1 and 5 goes to the lower id


def test_fill_when_fewer_distinct_tokens_than_vd():
  counts = np.array([0, 3, 0, 0, 7, 0])
  d2t, t2d = vocab.vocab_from_counts(counts, 4)
  check_invariants(d2t, t2d)
  assert list(np.arange(4) + d2t) == [0, 1, 2, 4]  # seen ids 1, 4, then the lowest unseen 0, 2
  with pytest.raises(ValueError, match="draft_vocab_size"):
    vocab.vocab_from_counts(counts, 7)


def test_draft_to_target_and_back():
  d2t, t2d = vocab.vocab_from_counts(np.array([4, 0, 3, 0, 0, 8, 1]), 4)
  draft = np.arange(4)
  target = draft_to_target(draft, d2t)
  assert list(target) == [0, 2, 5, 6]
  assert np.array_equal(target_to_draft(target, t2d), draft)
  assert list(target_to_draft(np.array([1, 3, 4]), t2d)) == [-1, -1, -1]
  jt = draft_to_target(jnp.arange(4), jnp.asarray(d2t))
  assert list(np.asarray(jt)) == [0, 2, 5, 6]


def test_build_counts_only_masked_tokens(tmp_path):
  tok = make_tokenizer("smollm2")
  cfg = _cfg(tmp_path)
  vm = vocab.build_vocab(cfg, tok, 40)
  examples = list(data.iterate_examples(cfg, tok))
  want = np.zeros(len(tok), np.int64)
  for tokens, mask in examples:
    np.add.at(want, tokens[mask == 1], 1)
  assert np.array_equal(vm.counts, want)
  check_invariants(vm.d2t, vm.t2d)
  eot = tok.convert_tokens_to_ids("<|im_end|>")
  assert vm.t2d[eot] and not vm.t2d[tok.convert_tokens_to_ids("<|im_start|>")]  # headers are never masked
  p = vm.provenance
  assert (p["examples"], p["masked_tokens"], p["draft_vocab_size"]) == (12, int(want.sum()), 40)
  assert p["coverage"] == pytest.approx(want[vm.t2d].sum() / want.sum()) and 0 < p["coverage"] < 1
  assert p["distinct"] == int((want > 0).sum()) and p["filled"] == max(0, 40 - p["distinct"])
  assert p["dataset"]["files"] == [["messages.jsonl", pathlib.Path(MESSAGES).stat().st_size]]


def test_target_vocab_larger_than_tokenizer(tmp_path):
  tok = make_tokenizer("qwen25")
  vm = vocab.build_vocab(_cfg(tmp_path), tok, 32, vocab_size=len(tok) + 64, max_examples=3)
  assert vm.vocab_size == len(tok) + 64 and vm.provenance["examples"] == 3
  check_invariants(vm.d2t, vm.t2d)


def test_save_load_round_trip_and_provenance_mismatch(tmp_path):
  tok = make_tokenizer("smollm2")
  cfg = _cfg(tmp_path)
  path = tmp_path / "vocab" / "draft_vocab.safetensors"
  built = vocab.load_or_build_vocab(path, cfg, tok, 48)
  loaded = vocab.load_or_build_vocab(path, cfg, tok, 48)  # second call reads the file
  assert np.array_equal(loaded.d2t, built.d2t) and np.array_equal(loaded.t2d, built.t2d)
  assert loaded.d2t.dtype == np.int64 and loaded.provenance == built.provenance
  with pytest.raises(ValueError, match="draft_vocab_size: stored 48, expected 64"):
    vocab.load_or_build_vocab(path, cfg, tok, 64)
  with pytest.raises(ValueError, match="dataset.source"):
    vocab.load_vocab(path, expect=vocab.vocab_provenance(
        dataclasses.replace(cfg, source=str(FIXTURES / "malformed.jsonl")), tok, 48))
  with pytest.raises(ValueError, match="dataset.max_length"):
    vocab.load_vocab(path, expect=vocab.vocab_provenance(dataclasses.replace(cfg, max_length=100), tok, 48))
  with pytest.raises(ValueError, match="tokenizer.vocab_sha256"):
    vocab.load_vocab(path, expect=vocab.vocab_provenance(cfg, make_tokenizer("llama3"), 48))
  other_template = make_tokenizer("smollm2", "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
  with pytest.raises(ValueError, match="tokenizer.chat_template_sha256"):
    vocab.load_vocab(path, expect=vocab.vocab_provenance(cfg, other_template, 48))


def test_all_malformed_dataset_cannot_build(tmp_path):
  with pytest.raises(ValueError, match="no usable row"):
    vocab.build_vocab(_cfg(tmp_path, source=str(FIXTURES / "all_malformed.jsonl")), make_tokenizer("smollm2"), 8)
