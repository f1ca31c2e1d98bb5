"""configs/*.py load, overrides coerce and refuse unknown keys, and the 70B v5p run fits a v5p chip's HBM."""

import math
import pathlib
import runpy

import jax
import pytest

from eagle3_jax.draft import head as draft
from eagle3_jax.train import memory
from eagle3_jax.config import LlamaConfig, load_config
from eagle3_jax.params import count_params
from eagle3_jax.target import llama
from eagle3_jax.config import TrainConfig

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
GiB = 1 << 30
# Llama-3.3-70B-Instruct / Llama-3.1-8B-Instruct shapes (their config.json).
LLAMA3_70B = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                         num_kv_heads=8, head_dim=128, rope_theta=500000.0)
LLAMA3_8B = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0)


@pytest.mark.parametrize("name", ["tiny", "smollm2_135m", "llama3_8b", "llama3_70b_v5p"])
def test_every_config_loads(name):
  cfg = load_config(CONFIGS / f"{name}.py")
  assert isinstance(cfg, TrainConfig)
  hash(cfg)  # static: usable as a jit constant
  assert cfg.data.batch_size % cfg.optim.grad_accum == 0


def test_overrides_coerce_by_annotation():
  cfg = load_config(CONFIGS / "tiny.py", ["optim.lr=1e-4", "mesh.fsdp=4", "mesh.data=2", "ttt.remat=true",
                                          "target.random.num_layers=6", "data.max_rows=10", "data.eval_source=none",
                                          "compute_dtype=bfloat16", "target.path=/x/y"])
  assert cfg.optim.lr == 1e-4 and cfg.mesh.fsdp == 4 and cfg.mesh.data == 2 and cfg.ttt.remat is True
  assert cfg.target.random.num_layers == 6 and cfg.data.max_rows == 10 and cfg.data.eval_source is None
  assert cfg.compute_dtype == "bfloat16" and cfg.target.path == "/x/y"


def test_overrides_valid_only_together_apply_in_any_order():
  for overrides in (["data.eval_fraction=0", "data.eval_source=/x.jsonl"],
                    ["data.eval_source=/x.jsonl", "data.eval_fraction=0"]):
    cfg = load_config(CONFIGS / "tiny.py", overrides + ["data.batch_size=4", "optim.lr=1e-4", "optim.lr=2e-4"])
    assert cfg.data.eval_source == "/x.jsonl" and cfg.data.eval_fraction == 0 and cfg.data.batch_size == 4
    assert cfg.optim.lr == 2e-4  # the last of a repeated key wins
  with pytest.raises(ValueError, match="also"):
    load_config(CONFIGS / "tiny.py", ["optim=1", "optim.lr=1"])


@pytest.mark.parametrize("override, match", [
    ("optim.lrr=1", "lrr"), ("nonsense=1", "nonsense"), ("optim.lr.x=1", "has no fields"), ("optim.lr", "key=value"),
    ("compute_dtype=float16", "compute_dtype"), ("features=sideways", "features"), ("ttt.remat=maybe", "boolean"),
    ("optim.grad_accum=3", "grad_accum"), ("optim.warmup=cubic", "warmup"),
])
def test_bad_overrides_raise_naming_the_key(override, match):
  with pytest.raises(ValueError, match=match):
    load_config(CONFIGS / "tiny.py", [override])


def test_offline_needs_a_feature_dir():
  with pytest.raises(ValueError, match="feature_dir"):
    load_config(CONFIGS / "tiny.py", ["features=offline"])


def test_llama3_70b_v5p_fits_the_chip():
  """Per-chip bytes on the v5p-128 mesh: weights and Adam state from eval_shape sharded by the rules table on an
  AbstractMesh, activations by arithmetic; the sum must leave >= 25% of the 95 GiB for XLA's own buffers."""
  v5p = runpy.run_path(str(CONFIGS / "llama3_70b_v5p.py"))  # its NUM_CHIPS / NUM_HOSTS
  cfg = load_config(CONFIGS / "llama3_70b_v5p.py")
  budget = memory.memory_budget(cfg, LLAMA3_70B, num_devices=v5p["NUM_CHIPS"], num_processes=v5p["NUM_HOSTS"])
  assert budget["mesh"] == {"data": 1, "fsdp": 16, "tensor": 4}
  # eval_shape counts: the Llama-3.3-70B parameter count, and a draft one decoder layer wide (+ 32000-id head).
  assert budget["target_params"] == sum(math.prod(a.shape) for a in jax.tree.leaves(llama.abstract_params(LLAMA3_70B)))
  assert 70.5e9 < budget["target_params"] < 70.6e9
  D, F = 8192, 28672
  expected_draft = 3 * D * D + 2 * D * (D + 2 * 1024) + D * D + 3 * D * F + 4 * D + D * 32000
  assert budget["draft_param_count"] == expected_draft
  # Sharded 64 ways where divisible: the bf16 target is 141 GB in all.
  assert budget["target_weights"] == pytest.approx(2 * budget["target_params"] / 64, rel=0.01)
  # Adam's two fp32 moments per draft weight, sharded like it (plus a scalar count).
  assert budget["optimizer_state"] == pytest.approx(2 * budget["draft_params"], rel=1e-3)
  assert budget["rows_per_device"] == 4
  assert budget["total"] < 0.75 * memory.HBM_BYTES["tpu_v5p"], {k: v / GiB for k, v in budget.items()
                                                                       if isinstance(v, int)}
  # And it is not vacuous: eight rows per chip without remat would not leave that margin.
  big = memory.memory_budget(load_config(CONFIGS / "llama3_70b_v5p.py", ["data.batch_size=8"]), LLAMA3_70B,
                                   num_devices=v5p["NUM_CHIPS"], num_processes=v5p["NUM_HOSTS"])
  assert big["total"] > 0.75 * memory.HBM_BYTES["tpu_v5p"]


def test_llama3_8b_fits_an_80gb_gpu():
  budget = memory.memory_budget(load_config(CONFIGS / "llama3_8b.py"), LLAMA3_8B, num_devices=8)
  assert budget["draft_param_count"] == count_params(draft.abstract_params(draft.DraftConfig.for_target(LLAMA3_8B,
                                                                                                    32000)))
  assert 424e6 < budget["draft_param_count"] < 425e6  # the official EAGLE3-LLaMA3.1-Instruct-8B: 424.69 M
  assert budget["total"] < 0.75 * memory.HBM_BYTES["h100"]
