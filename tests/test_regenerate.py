"""Regeneration on the tiny local HF Llama of test_infer: answers turn by turn, resume after a kill equals an
uninterrupted run row for row, skips are counted, settings are checked on resume, speculative regeneration equals
plain regeneration at T=0, and the output trains with the normal training loop."""

import json
import pathlib

import numpy as np
import pytest

from eagle3_jax.decode import batching, engine, sampling
from eagle3_jax.train import regenerate
from eagle3_jax.target import load
from test_infer import _WORDS, tiny_target  # noqa: F401  (tiny_target is a fixture)
from test_infer_spec import _random_draft


def _source(tmp_path, n=14):
  rng = np.random.default_rng(0)
  say = lambda k: " ".join(rng.choice(_WORDS, k))  # noqa: E731
  rows = []
  for i in range(n):
    turns = []
    for _ in range(1 + i % 3):
      turns += [{"from": "human", "value": say(3 + i % 5)}, {"from": "gpt", "value": say(4)}]
    rows.append({"id": f"r{i}", "conversations": turns})
  rows[3] = {"id": "bad", "conversations": [{"from": "robot", "value": "hi"}]}  # malformed
  rows[5] = {"id": "empty", "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}
  rows[8] = {"id": "long", "messages": [{"role": "user", "content": say(90)}, {"role": "assistant", "content": "a"}]}
  path = tmp_path / "src.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _factory(target_dir, draft_dir=None, max_new_tokens=10, fail_after=None, continuous=False):
  cfg, params = load.load_target(target_dir)
  tok = load.load_tokenizer(target_dir)
  ckpt, tree_cfg = None, None
  if draft_dir is not None:
    from eagle3_jax.decode.tree import TreeConfig

    cfg, ckpt = engine.load_draft(str(draft_dir), cfg)
    tree_cfg = TreeConfig(top_k=2, depth=3, total_tokens=6)
  calls = [0]

  def make(temperature):
    kw = dict(sampling_cfg=sampling.SamplingConfig(temperature=temperature), max_new_tokens=max_new_tokens,
              stop_ids=engine.stop_ids(tok, str(target_dir)), pad_id=tok.pad_token_id)
    if continuous:
      gen = batching.ContinuousBatcher(params, cfg, slots=2, sync_every=3, **kw)
    else:
      gen = engine.make_generator(params, cfg, draft_ckpt=ckpt, tree_cfg=tree_cfg, **kw)
    if fail_after is None:
      return gen
    name = "run" if continuous else "generate"
    inner = getattr(gen, name)

    def failing(*args, **kwargs):  # a "kill" in the middle of a chunk, after some batches were generated
      calls[0] += 1
      if calls[0] > fail_after:
        raise KeyboardInterrupt
      return inner(*args, **kwargs)

    setattr(gen, name, failing)
    return gen

  return make, tok


CFG = dict(max_prompt_tokens=60, batch_size=2, chunk_rows=4, temperatures=((0.0, 0.5), (1.0, 0.5)), seed=3)


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_resume_after_kill_equals_straight_run(tiny_target, tmp_path, mode):
  path, _, _ = tiny_target
  src = _source(tmp_path)
  cfg = regenerate.RegenConfig(source=src, **CFG, batching=mode)
  make, tok = _factory(path, continuous=mode == "continuous")
  straight = regenerate.regenerate(cfg, tmp_path / "straight.jsonl", make_generator=make, tokenizer=tok,
                                   pad_id=tok.pad_token_id, progress=False)
  rows = [json.loads(x) for x in (tmp_path / "straight.jsonl").read_text().splitlines()]
  assert straight["rows_consumed"] == 14 and straight["rows_written"] == len(rows) == 11
  assert straight["rows_skipped"] == {"empty": 1, "too_long": 1, "unknown_role": 1}
  assert {r["temperature"] for r in rows} == {0.0, 1.0}
  for r in rows:  # user turns kept, every assistant turn regenerated, alternating
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * len(r["finished"])
  assert max(len(r["finished"]) for r in rows) == 3  # later turns saw the earlier generated answers

  out = tmp_path / "killed.jsonl"
  make_failing, _ = _factory(path, fail_after=7, continuous=mode == "continuous")
  with pytest.raises(KeyboardInterrupt):
    regenerate.regenerate(cfg, out, make_generator=make_failing, tokenizer=tok, pad_id=tok.pad_token_id,
                          progress=False)
  state = json.loads((tmp_path / "killed.jsonl.state.json").read_text())
  assert 0 < state["position"] < 14 and state["bytes"] == out.stat().st_size
  with open(out, "a") as f:  # what a kill during a write leaves: half a line past the recorded bytes
    f.write('{"index": 99, "messa')
  resumed = regenerate.regenerate(cfg, out, make_generator=make, tokenizer=tok, pad_id=tok.pad_token_id,
                                  progress=False)
  assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
  assert {k: v for k, v in resumed.items() if k not in ("output", "seconds", "tokens_per_s")} == \
         {k: v for k, v in straight.items() if k not in ("output", "seconds", "tokens_per_s")}

  with pytest.raises(ValueError, match="other settings .*max_new_tokens"):
    regenerate.regenerate(regenerate.RegenConfig(source=src, **CFG | {"max_new_tokens": 5}, batching=mode), out,
                          make_generator=make, tokenizer=tok, progress=False)
  (tmp_path / "foreign.jsonl").write_text('{"messages": []}\n')
  with pytest.raises(ValueError, match="no foreign.jsonl.state.json"):
    regenerate.regenerate(cfg, tmp_path / "foreign.jsonl", make_generator=make, tokenizer=tok, progress=False)


def test_speculative_regeneration_equals_plain_at_t0(tiny_target, tmp_path):
  """Static speculative batches and continuous plain decoding write the same file at T = 0."""
  path, _, _ = tiny_target
  src = _source(tmp_path)
  cfg = regenerate.RegenConfig(source=src, **CFG | {"temperatures": ((0.0, 1.0),)})
  make, tok = _factory(path, continuous=True)
  make_spec, _ = _factory(path, draft_dir=_random_draft(path, tmp_path / "draft"))
  regenerate.regenerate(cfg, tmp_path / "plain.jsonl", make_generator=make, tokenizer=tok, progress=False)
  regenerate.regenerate(cfg, tmp_path / "spec.jsonl", make_generator=make_spec, tokenizer=tok, progress=False)
  assert (tmp_path / "spec.jsonl").read_text() == (tmp_path / "plain.jsonl").read_text()


def test_cli_first_turn_only_output_trains(tiny_target, tmp_path, capsys):
  path, _, _ = tiny_target
  src = _source(tmp_path, n=40)
  out = tmp_path / "regen.jsonl"
  summary = regenerate.main(["--source", src, "--output", str(out), "--target", str(path), "--first-turn-only",
                             "--max-new-tokens", "12", "--max-prompt-tokens", "60", "--batch-size", "4",
                             "--chunk-rows", "16", "--no-progress", "--compile-cache", "none"])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(rows) == summary["rows_written"] == 37 and all(len(r["finished"]) == 1 for r in rows)

  import dataclasses

  from eagle3_jax.train import loop
  from eagle3_jax.config import load_config

  cfg = load_config(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py", [
      f"run_dir={tmp_path / 'run'}", f"data.source={out}", "data.max_length=64", "data.batch_size=4",
      "draft.draft_vocab_size=48", "num_steps=30", "log_every=1", "eval_every=0", "progress=false",
      "checkpoint_every=1000"])
  cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, path=str(path), random=None, tokenizer=None,
                                                                         aux_layers=(1, 1, 1)))
  result = loop.train(cfg)
  assert result["step"] == 30 and result["data"]["used"] > 0
  metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  ce = [m["ce_j"][0] for m in metrics if m["split"] == "train"]
  assert np.mean(ce[-5:]) < np.mean(ce[:5]), ce


def test_prompt_bucket_gives_the_same_answers_from_one_shape(tiny_target, tmp_path):
  """--prompt-bucket pads every prompt of static batches to one length (one compiled shape, for an accelerator):
  the greedy answers are those of the engine's length buckets; a bucket shorter than the prompt limit, or
  continuous batching, is refused."""
  path, _, _ = tiny_target
  src = _source(tmp_path)
  cfg = regenerate.RegenConfig(source=src, **CFG | {"temperatures": ((0.0, 1.0),), "batching": "static"})
  make, tok = _factory(path)
  regenerate.regenerate(cfg, tmp_path / "buckets.jsonl", make_generator=make, tokenizer=tok, progress=False)
  shapes = []
  make_one, _ = _factory(path)

  def recording(temperature):
    gen = make_one(temperature)
    inner = gen.generate
    gen.generate = lambda batch: shapes.append(batch.tokens.shape) or inner(batch)
    return gen

  regenerate.regenerate(cfg, tmp_path / "one.jsonl", make_generator=recording, tokenizer=tok, progress=False,
                        prompt_bucket=64)
  assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "buckets.jsonl").read_text()
  assert set(shapes) == {(CFG["batch_size"], 64)}
  with pytest.raises(ValueError, match="prompt-bucket"):
    regenerate.regenerate(cfg, tmp_path / "short.jsonl", make_generator=make, tokenizer=tok, progress=False,
                          prompt_bucket=32)
  continuous = regenerate.RegenConfig(source=src, **CFG | {"batching": "continuous"})
  with pytest.raises(ValueError, match="prompt-bucket"):
    regenerate.regenerate(continuous, tmp_path / "cont.jsonl", make_generator=make, tokenizer=tok, progress=False,
                          prompt_bucket=64)
