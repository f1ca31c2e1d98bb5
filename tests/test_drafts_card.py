"""The shipped draft's card follows warm-start chains: every run's data and recipe, the last held-out eval, and the
vocabulary of the first run (a warm-started run only inherits it)."""

import json

import numpy as np

from eagle3_jax import drafts
from eagle3_jax.draft import vocab


def _run(path, *, source, init_from="", steps, tokens, acc, provenance):
  path.mkdir()
  cfg = {"init_from": init_from, "features": "offline", "feature_dtype": "bfloat16",
         "data": {"source": source, "eval_source": None, "eval_fraction": 0.05, "batch_size": 4, "max_length": 64},
         "ttt": {"steps": 3, "schedule": "0:1"}, "optim": {"lr": 1e-3, "decay": "cosine", "warmup_steps": 5}}
  (path / "config.json").write_text(json.dumps(cfg))
  rows = [{"split": "train", "step": steps, "tokens_trained": tokens},
          {"split": "eval", "step": steps, "acc_j": acc, "tau": 1 + sum(np.cumprod(acc))}]
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  d2t, t2d = vocab.vocab_from_counts(np.arange(16)[::-1], 8)
  vocab.save_vocab(path / "draft_vocab.safetensors",
                   vocab.DraftVocab(d2t=d2t, t2d=t2d, counts=np.zeros(16, np.int64), provenance=provenance))


def test_card_follows_the_warm_start_chain(tmp_path):
  data = tmp_path / "regen.jsonl"
  data.write_text("")
  (tmp_path / "regen.jsonl.state.json").write_text(json.dumps({"config": {"max_new_tokens": 256}}))
  _run(tmp_path / "first", source=str(data), steps=100, tokens=1e5, acc=[0.3, 0.2, 0.1],
       provenance={"examples": 11, "masked_tokens": 222, "distinct": 8, "filled": 0, "coverage": 0.99})
  _run(tmp_path / "second", source="mix.jsonl", init_from=str(tmp_path / "first" / "export_step_100"), steps=50,
       tokens=5e4, acc=[0.4, 0.3, 0.2], provenance={"init_from": "x"})
  assert drafts.run_chain(tmp_path / "second") == [tmp_path / "first", tmp_path / "second"]
  text = drafts.card(tmp_path / "second", measured="## Measured\n\nok")
  assert "2 runs" in text and text.index("`first` (from random weights)") < text.index("`second` (from ")
  assert '"max_new_tokens": 256' in text  # the regeneration settings of the first run's data
  assert "acc_j (j = 0..2): 0.400, 0.300, 0.200" in text  # the last run's eval
  assert "11 rows, 222 assistant tokens" in text and "coverage 0.9900" in text  # the first run's vocabulary
  assert text.rstrip().endswith("ok")
  assert drafts.run_chain(tmp_path / "first") == [tmp_path / "first"]
