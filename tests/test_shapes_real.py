"""Real-size Llama configs give the published parameter counts through abstract shapes only (nothing allocated)."""

import math

import jax
import pytest

from eagle3_jax.params import count_params
from eagle3_jax import sharding
from eagle3_jax.target import llama
from eagle3_jax.target import hf

_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# Values from the published config.json files of meta-llama/Llama-3.1-8B and meta-llama/Llama-3.3-70B-Instruct.
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": _LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
LLAMA_3_3_70B = LLAMA_3_1_8B | {
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_size": 8192,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "transformers_version": "4.47.0.dev0",
}


@pytest.mark.parametrize("hf_config, published", [(LLAMA_3_1_8B, 8_030_261_248), (LLAMA_3_3_70B, 70_553_706_496)])
def test_published_parameter_counts(hf_config, published):
  cfg = hf.llama_config_from_hf(hf_config)
  assert cfg.head_dim == 128 and cfg.rope_scaling is not None
  shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
  assert count_params(shapes) == published
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda s: s.shape, llama.abstract_params(cfg))
  # A checkpoint with exactly these tensors is what load_hf will ask for.
  assert sum(math.prod(e.hf_shape) for e in hf.hf_tensor_table(cfg).values()) == published


def test_70b_weights_split_over_fsdp_and_tensor():
  cfg = hf.llama_config_from_hf(LLAMA_3_3_70B)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=4, tensor=2))
  abstract = llama.abstract_params(cfg)
  shardings = sharding.tree_shardings(mesh, llama.param_axes(cfg), abstract)
  per_device = sum(math.prod(sh.shard_shape(x.shape)) for sh, x in
                   zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)))
  # Only the [D] norm vectors are replicated; everything else is split 8 ways.
  norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
  assert per_device == (count_params(abstract) - norms) // 8 + norms
