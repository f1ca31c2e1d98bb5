"""Our JAX target == transformers' PyTorch model (logits and aux taps) for every supported family, via load_hf."""

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp

from eagle3_jax import sharding
from eagle3_jax.target import llama
from eagle3_jax.target import hf
from eagle3_jax.nn import masks

B, T = 2, 12
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"rope_parameters": _LLAMA3_ROPE}),
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                {"sliding_window": None, "head_dim": 32, "rope_parameters": {"rope_type": "default",
                                                                             "rope_theta": 1e6}}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}


def _hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
  config_cls, model_cls, extra = CASES[case]
  torch.manual_seed(seed)
  model = model_cls(config_cls(**_SMALL, **extra, attn_implementation="eager")).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0, which would hide a mis-mapped norm or bias
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _tokens(seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, _SMALL["vocab_size"], size=(B, T))


def _hf_outputs(model, tokens):
  with torch.no_grad():
    out = model(torch.tensor(tokens), output_hidden_states=True)
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def _our_outputs(cfg, params, tokens):
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = masks.causal_mask(jnp.full((B,), T), T)
  fwd = jax.jit(llama.forward, static_argnames="cfg")
  logits, aux, _ = fwd(params, jnp.asarray(tokens), positions, None, mask, cfg=cfg)
  return np.asarray(logits), np.asarray(aux)


def _check(model, cfg, params, tokens):
  ref_logits, ref_hidden = _hf_outputs(model, tokens)
  assert ref_logits.std() > 0.3, "reference logits too flat for the tolerance to mean anything"
  logits, aux = _our_outputs(cfg, params, tokens)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
  ids = cfg.aux_layer_ids
  assert len(set(ids)) == 3, ids
  ref_aux = np.concatenate([ref_hidden[i] for i in ids], axis=-1)
  np.testing.assert_allclose(aux, ref_aux, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_aux_match_transformers(case, tmp_path):
  model = _hf_model(case)
  model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").is_file()
  cfg, params = hf.load_hf(tmp_path)
  assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
  assert cfg.attention_bias == (case == "qwen2") and cfg.qk_norm == (case == "qwen3")
  assert (cfg.rope_scaling is not None) == (case == "llama3_rope")
  _check(model, cfg, params, _tokens())


def test_final_hidden_tap_is_the_residual_before_the_final_norm(tmp_path):
  """Aux id L (speculators' "final hidden state", always stored by its data generator and passed through the
  verifier's norm in training) is the residual leaving the last layer: transformers' input to model.norm."""
  import dataclasses

  model = _hf_model("llama")
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_hf(tmp_path)
  L = cfg.num_layers
  cfg = dataclasses.replace(cfg, aux_layers=(2, 4, L))
  captured = []
  model.model.norm.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach().numpy()))
  ref_logits, ref_hidden = _hf_outputs(model, _tokens())
  logits, aux = _our_outputs(cfg, params, _tokens())
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
  ref_aux = np.concatenate([ref_hidden[2], ref_hidden[4], captured[0]], axis=-1)
  np.testing.assert_allclose(aux, ref_aux, atol=1e-4, rtol=1e-4)
  assert not np.allclose(captured[0], ref_hidden[L], atol=1e-2)  # transformers' last hidden_states entry is normed
  with pytest.raises(ValueError, match="outside"):
    dataclasses.replace(cfg, aux_layers=(2, 4, L + 1))


def test_sharded_index_checkpoint(tmp_path):
  model = _hf_model("llama")
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
  cfg, params = hf.load_hf(tmp_path)
  _check(model, cfg, params, _tokens())


def test_bfloat16_checkpoint_loads_to_requested_dtype(tmp_path):
  model = _hf_model("qwen3")
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  cfg, params = hf.load_hf(tmp_path, dtype=jnp.float32)
  ref = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # bf16 -> fp32 is exact
  np.testing.assert_array_equal(np.asarray(params["layers"][1]["wq"]).reshape(cfg.hidden_size, -1), ref.T)
  _, bf16 = hf.load_hf(tmp_path, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


def test_load_onto_mesh_shards_weights_and_matches(tmp_path):
  assert jax.device_count() == 8
  model = _hf_model("qwen2")
  model.save_pretrained(tmp_path)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  cfg, params = hf.load_hf(tmp_path, mesh=mesh)
  _, host = hf.load_hf(tmp_path)
  for ours, ref in zip(jax.tree.leaves(params), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  axes = llama.param_axes(cfg)
  for path in [("embed",), ("layers", 0, "wq"), ("layers", 3, "w_down")]:
    x, ax = params, axes
    for p in path:
      x, ax = x[p], ax[p]
    assert x.sharding == sharding.named_sharding(mesh, ax, x.shape), path
    shard = x.addressable_shards[0].data.shape
    assert np.prod(shard) < np.prod(x.shape), (path, shard, x.shape)
  _check(model, cfg, params, _tokens())
