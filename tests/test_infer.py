"""infer.py end to end on a tiny local HF Llama (random weights, word-level tokenizer with a chat template)."""

import json
import pathlib
import subprocess
import sys

import pytest

load = pytest.importorskip("eagle3_jax.target.load")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # infer.py is a top-level script, not part of the package

import infer  # noqa: E402
_SPECIAL = ["<pad>", "<s>", "</s>", "[UNK]", "<|system|>", "<|user|>", "<|assistant|>"]
_WORDS = ("the a cat dog sat on mat hello world what is two plus one and blue sky why red green tree house "
          "run jump big small good bad yes no i you we they it this that here there").split()
_QUIET = ("--no-progress", "--compile-cache", "none")  # no bar, and no XLA cache written under ~/.cache
_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  vocab = {w: i for i, w in enumerate(_SPECIAL + _WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece()  # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="[UNK]")
  fast.add_special_tokens({"additional_special_tokens": _SPECIAL[4:]})
  fast.chat_template = _TEMPLATE
  return fast


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama")
  tok = _tokenizer()
  hf_cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path, model, tok


def _hf_greedy(model, tok, prompt, max_new):
  text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
  ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=2, pad_token_id=0)
  return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_end_to_end_greedy_matches_transformers_generate(tiny_target, tmp_path, capsys, batching):
  path, model, tok = tiny_target
  prompts = ["hello world", "the cat sat on the mat and the dog sat on the big mat", "why is the sky blue"]
  out = tmp_path / "out.jsonl"
  summary = infer.main(["--target", str(path), *sum((["--prompt", p] for p in prompts), []), "--max-new-tokens",
                        "12", "--batch-size", "2", "--batching", batching, "--output", str(out), *_QUIET])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last == summary
  assert last["requests"] == 3 and last["tokens_per_s"] > 0 and last["draft"] == "none"
  assert last["batching"] == batching and 0 < last["utilisation"] <= 1
  if batching == "static":
    # Sorted by length: the two short prompts share a 16-token bucket, the long one gets 24: one compile each.
    assert last["shapes"] == [[2, 16], [2, 24]] and last["compiles"] == 2
  else:  # caches of 32 (bucket 16 + 12 new) then 64 (24 + 12): an admission and a step loop at each, one grow
    assert last["admissions"] == 3 and last["compiles"] == 5
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 3
  for prompt, row in zip(prompts, rows):
    assert set(row) >= {"text", "tokens", "token_ids", "seconds"} and row["seconds"] > 0
    assert row["token_ids"] == _hf_greedy(model, tok, prompt, 12), prompt
    assert row["tokens"] == len(row["token_ids"])
    assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)


def test_sampling_flags_are_seeded(tiny_target, tmp_path):
  path, _, _ = tiny_target
  runs = {}
  for name, seed in (("a", 3), ("b", 3), ("c", 4)):
    out = tmp_path / f"{name}.jsonl"
    infer.main(["--target", str(path), "--prompt", "what is two plus one", "--prompt", "hello", "--temperature",
                "1.5", "--top-k", "20", "--top-p", "0.95", "--max-new-tokens", "16", "--seed", str(seed),
                "--output", str(out), *_QUIET])
    runs[name] = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
  assert runs["a"] == runs["b"]
  assert runs["a"] != runs["c"]


def test_default_prompts_are_humaneval_and_chat():
  requests = infer.default_requests()
  ids = [r["id"] for r in requests]
  assert sum(i.startswith("HumanEval/") for i in ids) >= 3 and sum(i.startswith("chat/") for i in ids) >= 2
  assert all(r["messages"][0]["role"] == "user" and r["messages"][0]["content"] for r in requests)


def test_prompts_file_errors_name_the_line(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    infer.read_jsonl(str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "hi"}\n\n{"prompt": "oops"\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
    infer.read_jsonl(str(bad))
  bad.write_text('{"prompt": "hi"}\n{"text": "no prompt key"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with 'messages', 'prompt' or 'turns'"):
    infer.read_jsonl(str(bad))
  good = tmp_path / "good.jsonl"
  good.write_text('{"prompt": "hi"}\n{"messages": [{"role": "user", "content": "yo"}]}\n')
  assert len(infer.read_jsonl(str(good))) == 2


def test_question_files_first_turn_and_multi_turn(tiny_target, tmp_path):
  """EAGLE question files ({"question_id", "turns"}): the first turn alone by default; with --multi-turn each
  answer joins the conversation, so turn 2's answer is what decoding [user 1, answer 1, user 2] gives."""
  path, model, tok = tiny_target
  q = tmp_path / "question.jsonl"
  q.write_text(json.dumps({"question_id": 81, "turns": ["hello world", "why is the sky blue"]}) + "\n"
               + json.dumps({"question_id": 82, "turns": ["the cat sat"]}) + "\n")
  common = ["--target", str(path), "--prompts", str(q), "--max-new-tokens", "8", *_QUIET]
  first = tmp_path / "first.jsonl"
  s1 = infer.main(common + ["--output", str(first)])
  rows = [json.loads(x) for x in first.read_text().splitlines()]
  assert s1["requests"] == 2 and [r["id"] for r in rows] == [81, 82]
  assert rows[0]["token_ids"] == _hf_greedy(model, tok, "hello world", 8)
  multi = tmp_path / "multi.jsonl"
  s2 = infer.main(common + ["--multi-turn", "--output", str(multi)])
  rows2 = [json.loads(x) for x in multi.read_text().splitlines()]
  a1 = rows[0]["token_ids"]
  convo = [{"role": "user", "content": "hello world"},
           {"role": "assistant", "content": tok.decode(a1, skip_special_tokens=True)},
           {"role": "user", "content": "why is the sky blue"}]
  ids = torch.tensor([tok.encode(tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False)])
  with torch.no_grad():
    a2 = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, eos_token_id=2,
                        pad_token_id=0)[0, ids.shape[1]:].tolist()
  assert rows2[0]["token_ids"] == a1 + a2 and rows2[1]["token_ids"] == rows[1]["token_ids"]
  assert s2["tokens"] == len(a1) + len(a2) + len(rows[1]["token_ids"]) and s2["requests"] == 2
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"turns": []}\n')
  with pytest.raises(ValueError, match="'turns' must be a non-empty list"):
    infer.read_jsonl(str(bad))


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text("not json\n")
  proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--prompts", str(bad)], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0
  assert "bad.jsonl:1: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
  proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--draft", "some/dir"], capture_output=True,
                        text=True, cwd=ROOT, timeout=300)
  assert proc.returncode != 0 and "--draft" in proc.stderr


def test_bad_request_and_sampling_flags_raise(tiny_target):
  path, _, _ = tiny_target
  with pytest.raises(ValueError, match="SamplingConfig.top_p"):
    infer.main(["--target", str(path), "--prompt", "hi", "--top-p", "0"])
  with pytest.raises(ValueError, match="needs 'messages' or 'prompt'"):
    from eagle3_jax.decode import engine
    engine.Engine(None, _tokenizer()).encode([{"text": "x"}])
