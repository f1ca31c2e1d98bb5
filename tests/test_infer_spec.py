"""infer.py with --draft: speculative decoding end to end on the tiny local HF Llama of test_infer, compared with
plain decoding (--compare) and with transformers, plus the draft-flag errors."""

import json

import jax
import numpy as np
import pytest

from eagle3_jax.decode import engine
from test_infer import _QUIET, _hf_greedy, infer, tiny_target  # noqa: F401  (tiny_target is a fixture)


def _random_draft(target_dir, out_dir):
  """A random draft in the official EAGLE layout; aux layers (1, 1, 1) differ from the 2-layer target's default."""
  from eagle3_jax.draft import head as draft
  from eagle3_jax.draft.vocab import DraftVocab
  from eagle3_jax import interop
  from eagle3_jax.target import load

  cfg, _ = load.load_target(target_dir)
  dcfg = draft.DraftConfig.for_target(cfg, draft_vocab_size=48)
  params = jax.tree.map(np.asarray, draft.init_params(dcfg, jax.random.key(0)))
  ids = np.sort(np.random.default_rng(0).choice(cfg.vocab_size, 48, replace=False))
  ckpt = interop.DraftCheckpoint(cfg=dcfg, params=params, vocab=DraftVocab.from_ids(ids, cfg.vocab_size),
                                 aux_layer_ids=(1, 1, 1))
  interop.write_draft(out_dir, ckpt, layout="eagle")
  return out_dir


TREE = ("--draft-top-k", "2", "--draft-depth", "3", "--draft-tokens", "6")


def test_greedy_speculative_infer_equals_vanilla_and_transformers(tiny_target, tmp_path, capsys):
  path, model, tok = tiny_target
  draft_dir = _random_draft(path, tmp_path / "draft")
  prompts = ["hello world", "the cat sat on the mat and the dog sat on the big mat", "why is the sky blue"]
  out = tmp_path / "out.jsonl"
  summary = infer.main(["--target", str(path), "--draft", str(draft_dir), *TREE,
                        *sum((["--prompt", p] for p in prompts), []), "--max-new-tokens", "12", "--batch-size", "2",
                        "--compare", "--output", str(out), *_QUIET])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last == summary
  assert last["requests"] == 3 and last["tokens_per_s"] > 0 and last["vanilla_tokens_per_s"] > 0
  assert last["tau"] >= 1 and last["speedup"] > 0 and last["identical_to_vanilla"] is True
  assert last["tree"] == {"top_k": 2, "depth": 3, "total_tokens": 6} and last["compiles"] == 2
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  for prompt, row in zip(prompts, rows):
    assert row["tau"] >= 1 and row["rounds"] >= 1
    assert row["token_ids"] == _hf_greedy(model, tok, prompt, 12), prompt


def test_continuous_speculative_infer_equals_transformers(tiny_target, tmp_path):
  """--batching continuous with a draft: 2 slots refilled over 3 requests, each row greedy == transformers."""
  path, model, tok = tiny_target
  draft_dir = _random_draft(path, tmp_path / "draft")
  prompts = ["hello world", "the cat sat on the mat and the dog sat on the big mat", "why is the sky blue"]
  out = tmp_path / "out.jsonl"
  summary = infer.main(["--target", str(path), "--draft", str(draft_dir), *TREE, "--batching", "continuous",
                        *sum((["--prompt", p] for p in prompts), []), "--max-new-tokens", "12", "--batch-size", "2",
                        "--output", str(out), *_QUIET])
  assert summary["batching"] == "continuous" and summary["admissions"] == 3 and summary["rounds"] >= 3
  assert summary["tau"] == round(summary["accepted"] / summary["rounds"], 4)  # what serve() sums over turns
  assert 0 < summary["utilisation"] <= 1
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  for prompt, row in zip(prompts, rows):
    assert row["token_ids"] == _hf_greedy(model, tok, prompt, 12), prompt
    assert row["rounds"] >= 1 and row["tau"] >= 1


def test_sampled_speculative_infer_is_seeded(tiny_target, tmp_path):
  path, _, _ = tiny_target
  draft_dir = _random_draft(path, tmp_path / "draft")
  runs = []
  for seed in (5, 5):
    out = tmp_path / f"{len(runs)}.jsonl"
    summary = infer.main(["--target", str(path), "--draft", str(draft_dir), *TREE, "--prompt", "what is two plus one",
                          "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "10", "--seed", str(seed),
                          "--output", str(out), *_QUIET])
    assert "identical_to_vanilla" not in summary and summary["tau"] >= 1
    runs.append([json.loads(line)["token_ids"] for line in out.read_text().splitlines()])
  assert runs[0] == runs[1] and len(runs[0][0]) > 0


def test_tree_auto_measures_and_falls_back_to_plain_decoding(tiny_target, tmp_path, monkeypatch):
  """A random draft with no acceptance file: auto measures its acceptance on greedy answers to the requests,
  calibrates this machine (cached under EAGLE3_JAX_CACHE) and, as such a draft accepts almost nothing, decodes
  plainly; a second run reuses the calibration."""
  path, model, tok = tiny_target
  monkeypatch.setenv("EAGLE3_JAX_CACHE", str(tmp_path / "cache"))
  draft_dir = _random_draft(path, tmp_path / "draft")
  args = ["--target", str(path), "--draft", str(draft_dir), "--prompt", "hello world", "--prompt", "why is the sky",
          "--max-new-tokens", "12", "--compare", "--tree", "auto", *_QUIET]
  summary = infer.main(args)
  assert summary["auto"]["tree"] == "none" and summary["draft"].startswith("none (auto")
  assert "tree" not in summary and summary["identical_to_vanilla"] is True
  cached = list((tmp_path / "cache" / "autotree").glob("costs-*.json"))
  assert len(cached) == 1
  mtime = cached[0].stat().st_mtime_ns
  assert infer.main(args)["auto"] == summary["auto"] and cached[0].stat().st_mtime_ns == mtime


def test_draft_flag_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="--draft .*no such draft directory"):
    infer.main(["--draft", str(tmp_path / "missing"), "--prompt", "hi"])
  with pytest.raises(ValueError, match="--compare .* needs --draft"):
    infer.main(["--draft", "none", "--compare", "--prompt", "hi"])
  with pytest.raises(ValueError, match="cannot be built"):
    infer.main(["--draft", str(tmp_path), "--draft-top-k", "2", "--draft-depth", "2", "--draft-tokens", "9",
                "--prompt", "hi"])
  with pytest.raises(FileNotFoundError, match="--draft .*no config.json"):
    engine.load_draft(str(tmp_path), None)


def test_engine_takes_a_protocol_target(tiny_target, tmp_path):
  """load_draft / make_generator with a Target built by the caller (any JAX model's road to the host engine): the
  same tokens as through the bundled LlamaConfig; a draft reading another aux width is refused."""
  import dataclasses

  from eagle3_jax.decode import sampling
  from eagle3_jax.decode.tree import TreeConfig
  from eagle3_jax.target import load, protocol

  path, _, tok = tiny_target
  draft_dir = _random_draft(path, tmp_path / "draft")
  cfg, params = load.load_target(path)
  target = protocol.llama_target(dataclasses.replace(cfg, aux_layers=(1, 1, 1)))  # the draft's taps
  same, ckpt = engine.load_draft(str(draft_dir), target)
  assert same is target
  common = dict(draft_ckpt=ckpt, tree_cfg=TreeConfig(top_k=2, depth=3, total_tokens=6),
                sampling_cfg=sampling.SamplingConfig(), max_new_tokens=8)
  prompts = [{"prompt": "hello world"}, {"prompt": "why is the sky blue"}]
  got, _ = engine.Engine(engine.make_generator(params, target, **common), tok, batch_size=2).run(
      prompts, progress=False)
  llama_cfg, _ = engine.load_draft(str(draft_dir), cfg)
  want, _ = engine.Engine(engine.make_generator(params, llama_cfg, **common), tok, batch_size=2).run(
      prompts, progress=False)
  assert [r.token_ids for r in got] == [r.token_ids for r in want]
  narrow = protocol.llama_target(dataclasses.replace(cfg, aux_layers=(1, 1)))
  with pytest.raises(ValueError, match="aux_size"):
    engine.load_draft(str(draft_dir), narrow)
