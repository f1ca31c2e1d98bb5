"""The draft shipped in the package, on the real SmolLM2: infer.py finds it with no arguments, greedy speculative
output equals plain decoding token for token, and tau stays above a floor set from the measured value."""

import json

import pytest

from eagle3_jax.decode import autotree
from eagle3_jax import drafts, interop
from test_infer import infer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    drafts.default_draft_path() is None, reason="no draft shipped yet (issue 9: training in progress)")]

# Measured on the built-in prompts at 48 new tokens with the shipped draft (the GPU burst's, 2026-12-04) and its
# serving tree (1x3x3 since decode/xla_cpu.py made deeper chains pay on CPU): tau 1.73 (1x1x1: 1.51; BENCHMARKS.md
# "Few-row products on XLA:CPU"); the floor leaves a margin for float rounding elsewhere.
TAU_FLOOR = 1.60


def test_shipped_draft_is_found_and_readable():
  path = drafts.default_draft_path()
  assert path is not None, "eagle3_jax/drafts/smollm2_135m_instruct is missing"
  ckpt = interop.read_draft(path)
  assert ckpt.aux_layer_ids == (2, 15, 27) and ckpt.cfg.hidden_size == 576
  assert ckpt.extra.get("verifier") == "HuggingFaceTB/SmolLM2-135M-Instruct"
  tree = drafts.serving_tree(path)
  assert set(tree) == {"top_k", "depth", "total_tokens"}
  assert (path / "README.md").read_text().startswith("# EAGLE-3 draft for SmolLM2-135M-Instruct")
  acc = autotree.Acceptance.load(path / autotree.ACCEPTANCE_FILE)  # what --tree auto predicts acceptance from
  assert acc.ranks.shape[1] == autotree.MAX_DEPTH and acc.tau(autotree.TreeConfig.chain(1)) > 1.2


def test_default_infer_is_speculative_lossless_and_accepts(capsys):
  # The recorded tree: --tree auto, the default, calibrates for minutes and its choice (maybe no draft at all)
  # depends on the machine's speed (tests/test_autotree.py tests the choice; tests/test_infer_spec.py the flag).
  summary = infer.main(["--compare", "--temperature", "0", "--max-new-tokens", "48", "--no-progress",
                        "--compile-cache", "none", "--tree", "recorded"])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last == summary
  assert summary["draft"] == str(drafts.default_draft_path())
  assert summary["tree"] == drafts.serving_tree(drafts.default_draft_path())
  assert summary["identical_to_vanilla"] is True
  assert summary["tau"] >= TAU_FLOOR, summary["tau"]


def test_shipped_draft_converts_to_speculators_with_the_targets_embedding(tmp_path):
  """The shipped draft has no embed_tokens (it shares SmolLM2's); speculators' from_pretrained would leave it at
  zero, so convert writes the verifier's own embedding (found from the hub id) in the speculators layout."""
  import numpy as np
  from eagle3_jax import convert
  from eagle3_jax.target import load, protocol

  src = drafts.default_draft_path()
  assert convert.main([str(src), str(tmp_path / "spec"), "--to", "speculators"]) == 0
  spec = interop.read_draft(tmp_path / "spec")
  cfg, params = load.load_target()
  embed = np.asarray(protocol.llama_target(cfg).embed(params)).astype(np.float16).astype(np.float32)
  np.testing.assert_array_equal(spec.embed, embed)
  config = json.loads((tmp_path / "spec/config.json").read_text())
  assert config["speculators_config"]["verifier"] == {"name_or_path": load.DEFAULT_TARGET_HUB_ID,
                                                      "architectures": ["LlamaForCausalLM"]}
