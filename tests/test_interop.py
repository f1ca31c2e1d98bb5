"""Interop: each layout, built exactly as its producer writes it, reads into a draft whose logits match a PyTorch
reference of the documented forward; write -> read round trips are bit-exact; bad files are refused by name."""

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402

from eagle3_jax import convert, interop
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.interop import files
from eagle3_jax.config import LlamaConfig  # noqa: E402
from eagle3_jax.nn import masks
from eagle3_jax.target import protocol

D, F, N, K, H, V, VD = 64, 128, 4, 2, 16, 256, 64
L = 30  # target layers: official taps (2, 15, 27) in input numbering = (1, 14, 26) in output numbering
AUX_IN, AUX_OUT = (2, 15, 27), [1, 14, 26]
VERIFIER = "meta-llama/Llama-3.1-8B-Instruct"
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----- checkpoints in their producers' exact layouts ----------------------------------------------------------


def make_state(seed, *, dt=D, prefix="midlayer.", dtype=torch.float32, t2d=True, embed=False):
  """A state dict with the official key names, PyTorch [out, in] weights, int64 d2t and bool t2d."""
  g = torch.Generator().manual_seed(seed)
  mat = lambda o, i: (torch.randn(o, i, generator=g) / math.sqrt(i)).to(dtype)  # noqa: E731
  vec = lambda n: (1 + 0.2 * torch.randn(n, generator=g)).to(dtype)  # noqa: E731
  a = prefix + "self_attn."
  sd = {"fc.weight": mat(D, 3 * dt), prefix + "input_layernorm.weight": vec(D), prefix + "hidden_norm.weight": vec(D),
        a + "q_proj.weight": mat(N * H, 2 * D), a + "k_proj.weight": mat(K * H, 2 * D),
        a + "v_proj.weight": mat(K * H, 2 * D), a + "o_proj.weight": mat(D, N * H),
        prefix + "post_attention_layernorm.weight": vec(D), prefix + "mlp.gate_proj.weight": mat(F, D),
        prefix + "mlp.up_proj.weight": mat(F, D), prefix + "mlp.down_proj.weight": mat(D, F),
        "norm.weight": vec(D), "lm_head.weight": mat(VD, D)}
  ids = np.sort(np.random.default_rng(seed).choice(V, VD, replace=False))
  sd["d2t"] = torch.from_numpy(ids - np.arange(VD)).to(torch.int64)
  if t2d:
    sd["t2d"] = torch.zeros(V, dtype=torch.bool)
    sd["t2d"][ids] = True
  if embed:
    sd["embed_tokens.weight"] = torch.randn(V, D, generator=g).to(dtype)
  return sd, ids


def official_config(**kw):
  """The released EAGLE3-LLaMA3.1 config.json, shrunk: no head_dim, no rope_theta, no aux ids."""
  c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
       "pad_token_id": 0, "hidden_act": "silu", "hidden_size": D, "intermediate_size": F, "num_attention_heads": N,
       "num_key_value_heads": K, "num_hidden_layers": 1, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
       "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "float16",
       "transformers_version": "4.28.1", "use_cache": True, "vocab_size": V, "draft_vocab_size": VD}
  return c | kw


def sglang_config(**kw):
  """A SpecForge export: LlamaForCausalLMEagle3, the target's rope_theta, aux ids nested, output numbering."""
  return official_config(architectures=["LlamaForCausalLMEagle3"], head_dim=H, rope_theta=500000.0,
                         rope_scaling=None, torch_dtype="bfloat16",
                         eagle_config={"eagle_aux_hidden_state_layer_ids": AUX_OUT, "use_aux_hidden_state": True}) | kw


def modelopt_config(**kw):
  """ModelOpt's export template; its aux ids come from list(set(...)), so not necessarily sorted."""
  return sglang_config(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 26, 14], "use_aux_hidden_state": True,
                                     "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True,
                                     "use_mtp_layernorm": False, "next_layer_regular": True,
                                     "parallel_draft_step": 1, "parallel_draft_heads_num_layers": None}) | kw


def speculators_config(dt=48, **kw):
  """speculators' Eagle3SpeculatorConfig: transformer_layer_config is a diff against LlamaConfig defaults."""
  c = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", "speculators_version": "0.3.0",
       "transformer_layer_config": {"model_type": "llama", "hidden_size": D, "intermediate_size": F,
                                    "num_attention_heads": N, "num_key_value_heads": K, "head_dim": H,
                                    "num_hidden_layers": 1, "vocab_size": V, "rms_norm_eps": 1e-5,
                                    "rope_theta": 1000000.0, "max_position_embeddings": 4096},
       "draft_vocab_size": VD, "norm_before_residual": False, "target_hidden_size": dt,
       "eagle_aux_hidden_state_layer_ids": list(AUX_IN), "embed_requires_grad": False,
       "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                              "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5,
                                                    "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                              "verifier": {"name_or_path": VERIFIER, "architectures": ["LlamaForCausalLM"]}}}
  return c | kw


def save(path, config, sd, fmt="safetensors"):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(config))
  if fmt == "bin":
    torch.save(sd, path / "pytorch_model.bin")
  else:
    safetensors.torch.save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
  return path


CASES = {  # name: (config, torch dtype, file format, extra make_state kwargs, num_target_layers, rope theta, layout)
    "eagle_safetensors": (official_config(), torch.float16, "safetensors", {}, L, 10000.0, "eagle"),
    "eagle_bin": (official_config(), torch.float16, "bin", {}, L, 10000.0, "eagle"),
    "sglang": (sglang_config(), torch.bfloat16, "safetensors", {}, None, 500000.0, "sglang"),
    "speculators": (speculators_config(), torch.float32, "safetensors",
                    {"prefix": "layers.0.", "embed": True, "dt": 48}, None, 1000000.0, "speculators"),
    "modelopt": (modelopt_config(), torch.bfloat16, "safetensors", {"t2d": False}, None, 500000.0, "modelopt"),
}


# ----- the PyTorch reference of the documented draft forward (reference a.2) ----------------------------------


def torch_reference(sd, prefix, tokens, aux, embed, *, theta, eps=1e-5, norm_before_fc=False, fc_norm=False,
                    norm_before_residual=False, qk_norm=False, sliding_window=None, num_layers=1):
  """One draft step as speculators' Eagle3 core / model_definitions write it (the variant flags included; norm_output
  changes only what the next step receives, not this step's logits)."""
  w = {k: v.float() for k, v in sd.items() if v.is_floating_point()}
  p = lambda k: w[prefix + k]  # noqa: E731

  def rms(x, weight):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

  B, T = tokens.shape
  if norm_before_fc:  # speculators: self.input_norm over the concatenated states
    aux = rms(aux, w["input_norm.weight"])
  if fc_norm:  # speculators / SpecForge: one norm per chunk, then concatenated
    aux = torch.cat([rms(c, w[f"fc_norm.{i}.weight"]) for i, c in enumerate(aux.chunk(3, dim=-1))], -1)
  h = aux @ w["fc.weight"].T  # fc over cat(low, mid, high)
  u = torch.cat([rms(embed[tokens], p("input_layernorm.weight")), rms(h, p("hidden_norm.weight"))], -1)
  if norm_before_residual:  # residual = hidden_norm(hidden)
    h = rms(h, p("hidden_norm.weight"))
  inv = 1.0 / theta ** (torch.arange(0, H, 2, dtype=torch.float64) / H)
  ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
  cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
  rot = lambda x: torch.cat([-x[..., H // 2:], x[..., :H // 2]], -1)  # noqa: E731
  visible = torch.ones(T, T, dtype=torch.bool).tril()
  if sliding_window is not None:  # speculators' mask: kv_idx > q_idx - sliding_window
    visible &= torch.arange(T)[None, :] > torch.arange(T)[:, None] - sliding_window

  def layer(pre, u, h):  # attention over u (the layer's normed input) with residual h, then the SwiGLU block
    heads = lambda name, n: (u @ w[pre + f"self_attn.{name}.weight"].T).view(B, T, n, H).transpose(1, 2)  # noqa
    q, k, v = heads("q_proj", N), heads("k_proj", K), heads("v_proj", K)
    if qk_norm:  # transformers' Qwen3Attention: q_norm / k_norm over head_dim, before RoPE
      q, k = rms(q, w[pre + "self_attn.q_norm.weight"]), rms(k, w[pre + "self_attn.k_norm.weight"])
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k, v = k.repeat_interleave(N // K, dim=1), v.repeat_interleave(N // K, dim=1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(H)).masked_fill(~visible, -math.inf)
    h1 = h + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, N * H) @ w[pre + "self_attn.o_proj.weight"].T
    x = rms(h1, w[pre + "post_attention_layernorm.weight"])
    mlp = torch.nn.functional.silu(x @ w[pre + "mlp.gate_proj.weight"].T) * (x @ w[pre + "mlp.up_proj.weight"].T)
    return h1 + mlp @ w[pre + "mlp.down_proj.weight"].T

  h = layer(prefix, u, h)
  for i in range(1, num_layers):  # speculators' plain decoder layers 1..N-1
    h = layer(f"layers.{i}.", rms(h, w[f"layers.{i}.input_layernorm.weight"]), h)
  return rms(h, w["norm.weight"]) @ w["lm_head.weight"].T


@functools.partial(jax.jit, static_argnames="cfg")
def _jax_logits(params, tokens, aux, embed, *, cfg):
  B, T = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out, _ = draft.forward(params, embed[tokens], draft.fuse(params, aux, cfg=cfg), pos, None,
                         masks.causal_mask(jnp.full((B,), T), T), cfg=cfg)
  return draft.logits(params, out, cfg=cfg)


def jax_logits(ckpt, tokens, aux, embed):
  return np.asarray(_jax_logits(ckpt.params, tokens, aux, jnp.asarray(embed), cfg=ckpt.cfg))


@pytest.mark.parametrize("case", list(CASES))
def test_each_layout_reads_into_the_reference_logits(tmp_path, case):
  config, dtype, fmt, kw, num_layers, theta, layout = CASES[case]
  sd, ids = make_state(1, dtype=dtype, **kw)
  ckpt = interop.read_draft(save(tmp_path / case, config, sd, fmt), num_target_layers=num_layers)
  assert ckpt.source_layout == layout
  assert ckpt.aux_layer_ids == AUX_IN
  assert ckpt.cfg.rope_theta == theta and ckpt.cfg.target_hidden_size == kw.get("dt", D)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(ckpt.params))
  np.testing.assert_array_equal(ckpt.vocab.target_ids(), ids)
  np.testing.assert_array_equal(np.flatnonzero(ckpt.vocab.t2d), ids)  # derived from d2t for ModelOpt
  rng = np.random.default_rng(2)
  tokens = rng.integers(V, size=(2, 7))
  aux = rng.standard_normal((2, 7, 3 * ckpt.cfg.target_hidden_size)).astype(np.float32)
  embed = ckpt.embed if ckpt.embed is not None else rng.standard_normal((V, D)).astype(np.float32)
  # fp16/bf16 files: the reference runs on the same rounded weights, in fp32.
  ref = torch_reference(sd, kw.get("prefix", "midlayer."), torch.from_numpy(tokens), torch.from_numpy(aux),
                        torch.from_numpy(np.asarray(embed, np.float32)), theta=theta)
  np.testing.assert_allclose(jax_logits(ckpt, tokens, aux, embed), ref.numpy(), atol=1e-4, rtol=1e-4)
  if case == "speculators":
    assert ckpt.extra["verifier"] == VERIFIER and ckpt.extra["speculative_tokens"] == 5
    np.testing.assert_array_equal(ckpt.embed, sd["embed_tokens.weight"].numpy())


VARIANTS = {  # name: the flags as speculators (and vLLM) name them; SpecForge writes fc_norm the same way
    "norm_before_fc": {"norm_before_fc": True},
    "fc_norm": {"fc_norm": True},
    "norm_before_residual": {"norm_before_residual": True},
    "eagle3.1": {"fc_norm": True, "norm_output": True},
    "speculators_train_default": {"norm_before_residual": True, "norm_before_fc": True, "norm_output": True},
    "qwen3": {"qk_norm": True},  # speculators' draft_arch "qwen3": transformer_layer_config.model_type qwen3
    "sliding_window": {"sliding_window": 4},  # speculators' trainer default (2048), shrunk below the 6 test tokens
    "three_layers": {"num_layers": 3},  # speculators' --num-layers: layers.1, layers.2 are plain decoder layers
    "qwen3_2layers_window": {"num_layers": 2, "qk_norm": True, "sliding_window": 4, "norm_before_residual": True},
    "qwen3_train_default": {"qk_norm": True, "norm_before_residual": True, "norm_before_fc": True, "norm_output": True},
}


def _variant_state(seed, flags, dt, **kw):
  sd, ids = make_state(seed, dt=dt, **kw)
  g = torch.Generator().manual_seed(seed + 100)
  if flags.get("norm_before_fc"):
    sd["input_norm.weight"] = 1 + 0.2 * torch.randn(3 * dt, generator=g)
  if flags.get("fc_norm"):
    sd.update({f"fc_norm.{i}.weight": 1 + 0.2 * torch.randn(dt, generator=g) for i in range(3)})
  mat = lambda o, i: torch.randn(o, i, generator=g) / math.sqrt(i)  # noqa: E731
  vec = lambda n: 1 + 0.2 * torch.randn(n, generator=g)  # noqa: E731
  for i in range(1, flags.get("num_layers", 1)):  # speculators' plain decoder layers
    pre = f"layers.{i}."
    sd.update({pre + "input_layernorm.weight": vec(D), pre + "self_attn.q_proj.weight": mat(N * H, D),
               pre + "self_attn.k_proj.weight": mat(K * H, D), pre + "self_attn.v_proj.weight": mat(K * H, D),
               pre + "self_attn.o_proj.weight": mat(D, N * H), pre + "post_attention_layernorm.weight": vec(D),
               pre + "mlp.gate_proj.weight": mat(F, D), pre + "mlp.up_proj.weight": mat(F, D),
               pre + "mlp.down_proj.weight": mat(D, F)})
  if flags.get("qk_norm"):
    prefixes = [kw.get("prefix", "midlayer.")] + [f"layers.{i}." for i in range(1, flags.get("num_layers", 1))]
    sd.update({f"{pre}self_attn.{n}_norm.weight": vec(H) for pre in prefixes for n in "qk"})
  return sd, ids


@pytest.mark.parametrize("layout", ["speculators", "sglang"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_read_into_the_reference_logits(tmp_path, variant, layout):
  """Each variant as its producer writes it reads into a draft whose logits equal the PyTorch reference written
  from speculators' forward; written back, it round trips bit-exactly in both layouts."""
  flags = VARIANTS[variant]
  layer_only = ("qk_norm", "sliding_window", "num_layers")  # transformer_layer_config fields
  if any(k in flags for k in layer_only) and layout != "speculators":
    pytest.skip("Qwen3-style, sliding-window and multi-layer drafts exist only in the speculators layout")
  if layout == "speculators":
    sd, _ = _variant_state(7, flags, 48, prefix="layers.0.", embed=True)
    config, theta = speculators_config() | {k: v for k, v in flags.items() if k not in layer_only}, 1000000.0
    if flags.get("qk_norm"):  # a diff against Qwen3Config, whose head_dim default (128) is not D / N
      config["transformer_layer_config"] = config["transformer_layer_config"] | {"model_type": "qwen3"}
    n = flags.get("num_layers", 1)
    config["transformer_layer_config"] = config["transformer_layer_config"] | {"num_hidden_layers": n}
    if flags.get("sliding_window"):  # as speculators' trainer writes it
      config["transformer_layer_config"] = config["transformer_layer_config"] | {
          "layer_types": ["sliding_attention"] * n, "sliding_window": flags["sliding_window"],
          "use_sliding_window": True}
  else:  # SpecForge's LlamaForCausalLMEagle3 (fc_norm top level) as vLLM reads it; norm_output needs our marker
    sd, _ = _variant_state(7, flags, D)
    config, theta = sglang_config(**{k: v for k, v in flags.items() if k != "norm_before_fc"}), 500000.0
    if flags.get("norm_before_fc"):
      config["eagle_config"] = config["eagle_config"] | {"norm_before_fc": True}
    if flags.get("norm_output"):
      config["eagle3_jax"] = {"format_version": 1, "norm_output": interop.formats.NORM_OUTPUT_FED_BACK}
  ckpt = interop.read_draft(save(tmp_path / "src", config, sd))
  for flag in (*interop.formats.VARIANT_FLAGS, "qk_norm"):
    assert getattr(ckpt.cfg, flag) == flags.get(flag, False), flag
  assert ckpt.cfg.sliding_window == flags.get("sliding_window") and ckpt.cfg.num_layers == flags.get("num_layers", 1)
  rng = np.random.default_rng(3)
  tokens = rng.integers(V, size=(2, 6))
  aux = rng.standard_normal((2, 6, 3 * ckpt.cfg.target_hidden_size)).astype(np.float32)
  embed = ckpt.embed if ckpt.embed is not None else rng.standard_normal((V, D)).astype(np.float32)
  ref = torch_reference(sd, "layers.0." if layout == "speculators" else "midlayer.", torch.from_numpy(tokens),
                        torch.from_numpy(aux), torch.from_numpy(np.asarray(embed, np.float32)), theta=theta,
                        **{k: v for k, v in flags.items() if k != "norm_output"})
  np.testing.assert_allclose(jax_logits(ckpt, tokens, aux, embed), ref.numpy(), atol=1e-4, rtol=1e-4)
  for out in interop.WRITE_LAYOUTS:
    if (ckpt.cfg.qk_norm or ckpt.cfg.sliding_window or ckpt.cfg.num_layers > 1) and out == "eagle":
      with pytest.raises(ValueError, match="the official EAGLE-3 layout has no"):
        interop.write_draft(tmp_path / out, ckpt, layout=out, include_embed=ckpt.embed is not None)
      continue
    interop.write_draft(tmp_path / out, ckpt, layout=out, verifier=VERIFIER, include_embed=ckpt.embed is not None)
    back = interop.read_draft(tmp_path / out)
    assert_same_ckpt(ckpt, back)
    interop.write_draft(tmp_path / f"{out}2", back, layout=out, include_embed=ckpt.embed is not None)
    assert_same_tensors(file_tensors(tmp_path / out), file_tensors(tmp_path / f"{out}2"))
  written = json.loads((tmp_path / "speculators/config.json").read_text())
  assert {k: written[k] for k in interop.formats.VARIANT_FLAGS} == {
      k: flags.get(k, False) for k in interop.formats.VARIANT_FLAGS}
  assert written["transformer_layer_config"]["model_type"] == ("qwen3" if flags.get("qk_norm") else "llama")


def test_requested_read_dtype_and_bf16_bin(tmp_path):
  sd, _ = make_state(1, dtype=torch.bfloat16)
  ckpt = interop.read_draft(save(tmp_path / "d", sglang_config(), sd, fmt="bin"), dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ckpt.params))
  np.testing.assert_array_equal(ckpt.params["norm"], sd["norm.weight"].float().numpy().astype(jnp.bfloat16))
  assert ckpt.extra["file_dtype"] == "bfloat16"


def test_sharded_safetensors_and_rope_parameters(tmp_path):
  sd, ids = make_state(2)
  config = sglang_config(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 250000.0})
  whole = interop.read_draft(save(tmp_path / "whole", config, sd))
  path = tmp_path / "sharded"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
  for file, keys in shards.items():
    safetensors.torch.save_file({k: sd[k] for k in keys}, str(path / file), metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  sharded = interop.read_draft(path)
  assert_same_ckpt(whole, sharded)
  assert sharded.cfg.rope_theta == 250000.0


# ----- write -> read ------------------------------------------------------------------------------------------


def random_ckpt(seed=0, *, dt=D, embed=False, extra=None):
  cfg = draft.DraftConfig(hidden_size=D, target_hidden_size=dt, intermediate_size=F, num_heads=N, num_kv_heads=K,
                          head_dim=H, vocab_size=V, draft_vocab_size=VD)
  rng = np.random.default_rng(seed)
  # Not the init values: every entry distinct, so a transposed or mis-reshaped weight cannot go unnoticed.
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) / 4, draft.abstract_params(cfg))
  vocab = DraftVocab.from_ids(np.sort(rng.choice(V, VD, replace=False)), V)
  e = rng.standard_normal((V, D)).astype(np.float32) if embed or dt != D else None
  return interop.DraftCheckpoint(cfg=cfg, params=params, vocab=vocab, aux_layer_ids=AUX_IN, embed=e,
                                 extra=extra or {})


def file_tensors(path):
  return safetensors.numpy.load_file(str(path / "model.safetensors"))


def assert_same_tensors(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def assert_same_ckpt(a, b):
  assert a.cfg == b.cfg and a.aux_layer_ids == b.aux_layer_ids
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  np.testing.assert_array_equal(a.vocab.d2t, b.vocab.d2t)
  np.testing.assert_array_equal(a.vocab.t2d, b.vocab.t2d)
  assert (a.embed is None) == (b.embed is None)
  if a.embed is not None:
    np.testing.assert_array_equal(a.embed, b.embed)


@pytest.mark.parametrize("layout", interop.WRITE_LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_write_read_round_trip_is_bit_exact(tmp_path, layout, dtype):
  ckpt = random_ckpt(dt=48, extra={"eos_token_id": [2, 3]})  # D != Dt: embed_tokens must travel too
  interop.write_draft(tmp_path / "a", ckpt, layout=layout, dtype=dtype, verifier=VERIFIER)
  back = interop.read_draft(tmp_path / "a")
  assert back.source_layout == layout and back.extra["file_dtype"] == dtype
  assert back.extra["verifier"] == VERIFIER and back.extra["eos_token_id"] == [2, 3]
  rounded = jax.tree.map(lambda x: x.astype(dtype).astype(np.float32), (ckpt.params, ckpt.embed))
  assert_same_ckpt(interop.DraftCheckpoint(ckpt.cfg, rounded[0], ckpt.vocab, ckpt.aux_layer_ids, rounded[1]), back)
  interop.write_draft(tmp_path / "b", back, layout=layout, dtype=dtype)
  assert_same_tensors(file_tensors(tmp_path / "a"), file_tensors(tmp_path / "b"))
  assert json.loads((tmp_path / "a/config.json").read_text()) == json.loads((tmp_path / "b/config.json").read_text())
  t = file_tensors(tmp_path / "a")
  assert t["d2t"].dtype == np.int64 and t["t2d"].dtype == bool and t["fc.weight"].dtype == np.dtype(dtype)


def test_eagle_to_speculators_to_eagle_preserves_everything(tmp_path):
  ckpt = random_ckpt(embed=True, extra={"verifier": VERIFIER, "verifier_architectures": ["LlamaForCausalLM"],
                                        "max_position_embeddings": 8192, "bos_token_id": 1})
  interop.write_draft(tmp_path / "e1", ckpt, layout="eagle")
  interop.write_draft(tmp_path / "s", interop.read_draft(tmp_path / "e1"), layout="speculators")
  interop.write_draft(tmp_path / "e2", interop.read_draft(tmp_path / "s"), layout="eagle")
  first, last = interop.read_draft(tmp_path / "e1"), interop.read_draft(tmp_path / "e2")
  assert_same_ckpt(ckpt, last)
  assert {k: last.extra[k] for k in interop.formats.PORTABLE_EXTRA if k in last.extra} == {
      k: first.extra[k] for k in interop.formats.PORTABLE_EXTRA if k in first.extra}
  assert last.extra["max_position_embeddings"] == 8192 and last.extra["verifier"] == VERIFIER
  assert_same_tensors(file_tensors(tmp_path / "e1"), file_tensors(tmp_path / "e2"))
  assert (tmp_path / "e1/config.json").read_text() == (tmp_path / "e2/config.json").read_text()


def test_written_configs_are_complete(tmp_path):
  ckpt = random_ckpt()
  interop.write_draft(tmp_path / "e", ckpt, layout="eagle")
  target_embed = np.random.default_rng(1).standard_normal((V, D)).astype(np.float32)
  interop.write_draft(tmp_path / "s", ckpt, layout="speculators", verifier=VERIFIER,
                      verifier_architectures=["LlamaForCausalLM"], speculative_tokens=4, target_embed=target_embed)
  e = json.loads((tmp_path / "e/config.json").read_text())
  s = json.loads((tmp_path / "s/config.json").read_text())
  llama = {"hidden_size": D, "intermediate_size": F, "num_attention_heads": N, "num_key_value_heads": K,
           "head_dim": H, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
           "num_hidden_layers": 1, "vocab_size": V, "hidden_act": "silu", "tie_word_embeddings": False}
  assert e["architectures"] == ["LlamaForCausalLMEagle3"] and e["model_type"] == "llama"
  assert llama.items() <= e.items() and e["draft_vocab_size"] == VD and "target_hidden_size" not in e
  assert e["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == AUX_OUT
  assert "eagle_aux_hidden_state_layer_ids" not in e  # vLLM would read a top-level list as input numbering
  assert e["eagle3_jax"]["aux_layer_numbering"] == "output"
  assert e["eagle3_jax"]["aux_layer_ids_input_numbering"] == list(AUX_IN)
  assert s["speculators_model_type"] == "eagle3" and s["architectures"] == ["Eagle3Speculator"]
  assert llama.items() <= s["transformer_layer_config"].items()
  assert s["eagle_aux_hidden_state_layer_ids"] == list(AUX_IN) and s["norm_before_residual"] is False
  assert s["speculators_config"]["verifier"] == {"name_or_path": VERIFIER, "architectures": ["LlamaForCausalLM"]}
  assert s["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
  assert "embed_tokens.weight" not in file_tensors(tmp_path / "e")
  assert any(k.startswith("layers.0.") for k in file_tensors(tmp_path / "s"))
  # transformers >= 4.56 reads dtype, older versions torch_dtype: both are written.
  assert e["dtype"] == e["torch_dtype"] == "float32" and s["dtype"] == s["torch_dtype"] == "float32"
  assert s["transformer_layer_config"]["dtype"] == "float32"
  # speculators' from_pretrained leaves a missing embedding at zero: the target's is written in its place.
  np.testing.assert_array_equal(file_tensors(tmp_path / "s")["embed_tokens.weight"], target_embed)
  assert {"d2t", "t2d"} <= set(file_tensors(tmp_path / "s"))


def test_full_vocab_speculators_export_has_no_vocab_maps(tmp_path):
  """speculators reports d2t / t2d of a full-vocabulary draft as unexpected keys; the eagle layout keeps them."""
  cfg = dataclasses.replace(random_ckpt().cfg, draft_vocab_size=V)
  params = jax.tree.map(lambda s: np.full(s.shape, 0.25, np.float32), draft.abstract_params(cfg))
  ckpt = interop.DraftCheckpoint(cfg=cfg, params=params, vocab=DraftVocab.identity(V), aux_layer_ids=AUX_IN,
                                 embed=np.ones((V, D), np.float32))
  interop.write_draft(tmp_path / "s", ckpt, layout="speculators", verifier=VERIFIER)
  interop.write_draft(tmp_path / "e", ckpt, layout="eagle")
  assert not {"d2t", "t2d"} & set(file_tensors(tmp_path / "s")) and {"d2t", "t2d"} <= set(file_tensors(tmp_path / "e"))
  for layout in ("s", "e"):
    back = interop.read_draft(tmp_path / layout)
    np.testing.assert_array_equal(back.vocab.d2t, 0) and np.testing.assert_array_equal(back.vocab.t2d, True)


# ----- aux-layer numbering ------------------------------------------------------------------------------------


def test_aux_ids_across_conventions_for_a_30_layer_target(tmp_path):
  assert interop.aux_ids_from_output_numbering([1, 14, 26]) == (2, 15, 27)
  assert interop.aux_ids_to_output_numbering((2, 15, 27)) == (1, 14, 26)
  target = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=N, num_kv_heads=K,
                       head_dim=H)
  assert interop.default_aux_layer_ids(L) == target.aux_layer_ids == (2, 15, 27)
  sd, _ = make_state(0)
  save(tmp_path / "official", official_config(), sd)
  with pytest.raises(ValueError, match="num_target_layers"):
    interop.read_draft(tmp_path / "official")
  with pytest.raises(ValueError, match="outside"):  # ids must exist in the stated target
    interop.read_draft(save(tmp_path / "sg", sglang_config(), sd), num_target_layers=20)
  vllm_style = official_config(architectures=["Eagle3LlamaForCausalLM"], eagle_aux_hidden_state_layer_ids=[27, 2, 15])
  assert interop.read_draft(save(tmp_path / "vllm", vllm_style, sd)).aux_layer_ids == AUX_IN  # input numbering
  final = official_config(architectures=["Eagle3LlamaForCausalLM"], eagle_aux_hidden_state_layer_ids=[2, 15, L])
  assert interop.read_draft(save(tmp_path / "final", final, sd), num_target_layers=L).aux_layer_ids == (2, 15, L)
  with pytest.raises(ValueError, match="outside"):  # L is the final hidden state (speculators), L + 1 nothing
    interop.read_draft(save(tmp_path / "past", official_config(eagle_aux_hidden_state_layer_ids=[2, 15, L + 1]), sd),
                       num_target_layers=L)
  inconsistent = sglang_config(eagle3_jax={"format_version": 1, "aux_layer_ids_input_numbering": [2, 15, 28]})
  with pytest.raises(ValueError, match="disagree"):
    interop.read_draft(save(tmp_path / "bad", inconsistent, sd))
  with pytest.raises(ValueError, match="input 0"):
    interop.write_draft(tmp_path / "x", dataclasses.replace(random_ckpt(), aux_layer_ids=(0, 2, 5)))
  with pytest.raises(ValueError, match="ascending"):
    interop.write_draft(tmp_path / "x", dataclasses.replace(random_ckpt(), aux_layer_ids=(27, 2, 15)))
  assert not (tmp_path / "x").exists()


# ----- refusals and errors that name the key ------------------------------------------------------------------


def _official(tmp_path, mutate_sd=None, **config_kw):
  sd, _ = make_state(0)
  if mutate_sd:
    mutate_sd(sd)
  return save(tmp_path / "d", official_config(**config_kw), sd)


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.update({"midlayer.self_attn.q_norm.weight": torch.ones(H)}), "midlayer.self_attn.q_norm.weight"),
    (lambda sd: sd.update({"verifier_lm_head.weight": torch.ones(V, D)}), "verifier_lm_head.weight"),
    (lambda sd: sd.pop("midlayer.mlp.up_proj.weight"), "midlayer.mlp.up_proj.weight"),
    (lambda sd: sd.pop("norm.weight"), "'norm.weight'"),
    (lambda sd: sd.update({"lm_head.weight": torch.ones(VD + 1, D)}), "lm_head.weight"),
    (lambda sd: sd.update({"midlayer.self_attn.o_proj.weight": torch.ones(N * H, D + 1)}), "o_proj.weight"),
    (lambda sd: sd.update({"fc.weight": torch.ones(D, 3 * D, dtype=torch.int32)}), "'fc.weight' has dtype"),
    (lambda sd: sd.update({"d2t": sd["d2t"][:-1]}), "'d2t'"),
    (lambda sd: sd.update({"d2t": sd["d2t"].flip(0)}), "'d2t'"),
    (lambda sd: sd["t2d"].__setitem__(0, ~sd["t2d"][0]), "'t2d'"),
    (lambda sd: [sd.pop("d2t"), sd.pop("t2d")], "'d2t'"),
    (lambda sd: sd.update({"layers.0.norm.weight": torch.ones(D)}), "mixes"),
    (lambda sd: sd.update({"midlayer.self_attn.q_norm.weight": torch.ones(H)}), "Qwen3-style q/k norm, but"),
])
def test_bad_keys_raise_naming_the_key(tmp_path, mutate, match):
  with pytest.raises(ValueError, match=match):
    interop.read_draft(_official(tmp_path, mutate), num_target_layers=L)


@pytest.mark.parametrize("config_kw, mutate, match", [
    ({"fc_norm": True}, None, "fc_norm"),
    ({}, lambda sd: sd.update({f"fc_norm.{i}.weight": torch.ones(D) for i in range(3)}), "fc_norm"),
    ({"norm_output": True}, None, "norm_output"),  # SpecForge 0.2.0 and #879 read it differently: ambiguous
    ({"norm_output": False}, None, "norm_output"),
    ({}, lambda sd: sd.update({"input_norm.weight": torch.ones(3 * D)}), "norm_before_fc"),
    ({"fc_norm": 1}, None, "true or false"),
    ({"num_hidden_layers": 2}, lambda sd: sd.update({"layers.1.hidden_norm.weight": torch.ones(D)}),
     "num_hidden_layers"),
    ({}, lambda sd: sd.update({"layers.1.input_layernorm.weight": torch.ones(D)}), "beyond those config.json"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, None, "rope_scaling"),
    ({"tie_word_embeddings": True}, None, "tie_word_embeddings"),
    ({"attention_bias": True}, None, "attention_bias"),
    ({"architectures": ["LlamaForCausalLMEagle"]}, None, "architectures"),
    ({"eagle_config": {"use_aux_hidden_state": False}}, None, "use_aux_hidden_state"),
    ({"eagle_config": {"use_mtp_layernorm": True}}, None, "use_mtp_layernorm"),
    ({"layer_types": ["sliding_attention"], "sliding_window": 1024}, None, "sliding-window"),
    ({"target_hidden_size": 48}, lambda sd: sd.update({"fc.weight": torch.ones(D, 144)}), "embed_tokens"),
])
def test_unimplemented_eagle_variants_are_refused(tmp_path, config_kw, mutate, match):
  with pytest.raises(ValueError, match=match):
    interop.read_draft(_official(tmp_path, mutate, **config_kw), num_target_layers=L)


@pytest.mark.parametrize("value, means, expect", [
    (True, "eagle3.1", True),  # SpecForge after #879 (its EAGLE 3.1 export: fc_norm + norm_output true)
    (False, "eagle3.1", False),
    (True, "final-norm", False),  # SpecForge 0.2.0's default: the final norm before lm_head, i.e. plain EAGLE-3
    (False, "final-norm", "without the final norm"),
    (True, "eagle3", "is not one of"),
])
def test_norm_output_read_as_the_caller_says(tmp_path, value, means, expect):
  """A SpecForge file carries norm_output without saying which SpecForge wrote it: the caller says, or it is
  refused (test_unimplemented_eagle_variants_are_refused); the meaning read is the network built."""
  sd, _ = _variant_state(7, {"fc_norm": True}, D)
  src = save(tmp_path / "src", sglang_config(fc_norm=True, norm_output=value), sd)
  if isinstance(expect, str):
    with pytest.raises(ValueError, match=expect):
      interop.read_draft(src, norm_output_means=means)
    return
  ckpt = interop.read_draft(src, norm_output_means=means)
  assert ckpt.cfg.norm_output is expect and ckpt.cfg.fc_norm
  interop.write_draft(tmp_path / "out", ckpt, layout="eagle")  # our write says which, so it reads back alone
  assert interop.read_draft(tmp_path / "out").cfg.norm_output is expect
  if expect:  # our own marker and a contradicting caller
    with pytest.raises(ValueError, match="contradicts"):
      interop.read_draft(tmp_path / "out", norm_output_means="final-norm")
  assert convert.main([str(src), str(tmp_path / "spec"), "--to", "speculators", "--verifier", VERIFIER,
                       "--no-embed", "--norm-output-means", means]) == 0
  assert json.loads((tmp_path / "spec/config.json").read_text())["norm_output"] is expect


@pytest.mark.parametrize("change, match", [
    ({"fc_norm": True}, "fc_norm"),  # set, but the file has no fc_norm.{i}.weight
    ({"fc_norm": True, "norm_before_fc": True}, "mutually exclusive"),
    ({"speculators_model_type": "eagle"}, "speculators_model_type"),
    ({"transformer_layer_config": {"model_type": "gemma3", "num_hidden_layers": 1}}, "model_type"),
    # A Qwen3-style layer needs its q/k norms (and Qwen3's head_dim default, 128, is not this file's 16).
    ({"transformer_layer_config": speculators_config()["transformer_layer_config"] | {"model_type": "qwen3"}},
     "q_norm"),
    ({"transformer_layer_config": {k: v for k, v in speculators_config()["transformer_layer_config"].items()
                                   if k != "head_dim"} | {"model_type": "qwen3"}}, "q_proj"),
    # Three layers stated, one in the file: the first missing weight is named.
    ({"transformer_layer_config": speculators_config()["transformer_layer_config"] | {"num_hidden_layers": 3}},
     "layers.1."),
    ({"transformer_layer_config": speculators_config()["transformer_layer_config"] | {
        "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}},
     "one sliding window for every layer"),
    ({"draft_vocab_size": VD + 1}, "lm_head.weight"),
    # speculators' trainer default: every draft layer attends within a 2048-token window.
    ({"transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 1, "sliding_window": None,
                                   "layer_types": ["sliding_attention"]}}, "sliding_window is None"),
    ({"transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 1,
                                   "layer_types": ["chunked_attention"]}}, "layer_types"),
    ({"transformer_layer_config": {"model_type": "llama", "num_hidden_layers": 1, "sliding_window": 2048}},
     "sliding_window=2048"),
])
def test_unimplemented_speculators_variants_are_refused(tmp_path, change, match):
  sd, _ = make_state(0, prefix="layers.0.", embed=True, dt=48)
  with pytest.raises(ValueError, match=match):
    interop.read_draft(save(tmp_path / "s", speculators_config() | change, sd))
  config = speculators_config()
  del config["norm_before_residual"]  # vLLM would serve it with norm_before_residual=true
  with pytest.raises(ValueError, match="norm_before_residual"):
    interop.read_draft(save(tmp_path / "missing", config, sd))


def test_unknown_speculators_key_is_not_called_multi_layer(tmp_path):
  sd, _ = make_state(0, prefix="layers.0.", embed=True, dt=48)
  sd["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(H // 2)
  with pytest.raises(ValueError, match="unknown key 'layers.0.self_attn.rotary_emb.inv_freq'"):
    interop.read_draft(save(tmp_path / "s", speculators_config(), sd))


def test_write_validates_before_writing(tmp_path):
  ckpt = random_ckpt()
  with pytest.raises(ValueError, match="verifier"):
    interop.write_draft(tmp_path / "s", ckpt, layout="speculators", include_embed=False)
  with pytest.raises(ValueError, match="layout"):
    interop.write_draft(tmp_path / "s", ckpt, layout="modelopt")
  bad = dict(ckpt.params, norm=np.ones(D + 1, np.float32))
  with pytest.raises(ValueError, match="'norm'"):
    interop.write_draft(tmp_path / "s", dataclasses.replace(ckpt, params=bad))
  with pytest.raises(ValueError, match="embed_tokens"):
    interop.write_draft(tmp_path / "s", random_ckpt(dt=48), include_embed=False)
  with pytest.raises(ValueError, match="speculators layout needs 'embed_tokens.weight'"):
    interop.write_draft(tmp_path / "s", ckpt, layout="speculators", verifier=VERIFIER)
  with pytest.raises(ValueError, match="embed has shape"):
    interop.write_draft(tmp_path / "s", ckpt, layout="speculators", verifier=VERIFIER, target_embed=np.ones((V, 3)))
  assert list(tmp_path.iterdir()) == []
  interop.write_draft(tmp_path / "s", ckpt, layout="speculators", verifier=VERIFIER, include_embed=False)
  assert "embed_tokens.weight" not in file_tensors(tmp_path / "s")


def test_write_is_atomic(tmp_path, monkeypatch):
  first, second = random_ckpt(0), random_ckpt(1)

  def disk_full(*args, **kwargs):
    raise OSError("disk full")

  with monkeypatch.context() as m:
    m.setattr(files.safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError):
      interop.write_draft(tmp_path / "d", first)
  assert list(tmp_path.iterdir()) == []  # no half-written directory, no temp left behind
  interop.write_draft(tmp_path / "d", first)
  with pytest.raises(FileExistsError):
    interop.write_draft(tmp_path / "d", second)
  with monkeypatch.context() as m:
    m.setattr(files.safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError):
      interop.write_draft(tmp_path / "d", second, overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["d"]
  assert_same_ckpt(first, interop.read_draft(tmp_path / "d"))
  interop.write_draft(tmp_path / "d", second, overwrite=True)
  assert_same_ckpt(second, interop.read_draft(tmp_path / "d"))
  assert [p.name for p in tmp_path.iterdir()] == ["d"]


# ----- the CLI, and a converted draft drafting the same tokens -------------------------------------------------


def test_convert_cli(tmp_path, capsys):
  sd, _ = make_state(3, dtype=torch.float16)
  src = save(tmp_path / "official", official_config(), sd, fmt="bin")
  assert convert.main([str(src), str(tmp_path / "spec"), "--to", "speculators"]) == 2
  assert "num_target_layers" in capsys.readouterr().err
  spec_args = [str(src), str(tmp_path / "spec"), "--to", "speculators", "--num-target-layers", str(L),
               "--verifier", VERIFIER, "--verifier-arch", "LlamaForCausalLM"]
  assert convert.main(spec_args) == 2  # SRC has no embedding and no --target gives one
  assert "embed_tokens" in capsys.readouterr().err and not (tmp_path / "spec").exists()
  assert convert.main(spec_args + ["--no-embed"]) == 0
  out = capsys.readouterr().out
  assert "[2, 15, 27]" in out and "embed_tokens: none (--no-embed)" in out
  spec = json.loads((tmp_path / "spec/config.json").read_text())
  assert spec["eagle_aux_hidden_state_layer_ids"] == list(AUX_IN)
  assert spec["speculators_config"]["verifier"]["name_or_path"] == VERIFIER
  assert file_tensors(tmp_path / "spec")["fc.weight"].dtype == np.float16  # --dtype auto keeps the source's
  result = subprocess.run([sys.executable, "-m", "eagle3_jax.convert", str(tmp_path / "spec"),
                           str(tmp_path / "back"), "--to", "eagle"], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  back = json.loads((tmp_path / "back/config.json").read_text())
  assert back["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == AUX_OUT
  assert_same_ckpt(interop.read_draft(src, num_target_layers=L), interop.read_draft(tmp_path / "back"))


_forward = jax.jit(draft.forward, static_argnames="cfg")
_logits = jax.jit(draft.logits, static_argnames="cfg")


def draft_chain(ckpt, embed, tokens, aux, steps):
  """Greedy draft-only continuation: prompt rows from target features, then the draft's own hidden fed back."""
  B, T = tokens.shape
  S = T + steps
  embed = jnp.asarray(embed)
  cache = draft.init_cache(ckpt.cfg, B, S)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out, cache = _forward(ckpt.params, embed[tokens], draft.fuse(ckpt.params, aux, cfg=ckpt.cfg), pos, cache,
                        masks.cache_causal_mask(cache.lengths, T, S), cfg=ckpt.cfg)
  cache = cache.replace(lengths=cache.lengths + T)
  hidden, chain = out[:, -1:], []
  for i in range(steps):
    tok = ckpt.vocab.to_target(jnp.argmax(_logits(ckpt.params, hidden, cfg=ckpt.cfg), -1))
    chain.append(np.asarray(tok))
    hidden, cache = _forward(ckpt.params, embed[tok], hidden, jnp.full((B, 1), T + i), cache,
                             masks.cache_causal_mask(cache.lengths, 1, S), cfg=ckpt.cfg)
    cache = cache.replace(lengths=cache.lengths + 1)
  return np.concatenate(chain, 1)


def test_converted_draft_drafts_the_same_tokens(tmp_path):
  ckpt = random_ckpt(5, embed=True)
  interop.write_draft(tmp_path / "e", ckpt)
  assert convert.main([str(tmp_path / "e"), str(tmp_path / "s"), "--to", "speculators", "--verifier", VERIFIER]) == 0
  assert convert.main([str(tmp_path / "s"), str(tmp_path / "e2"), "--to", "eagle"]) == 0
  rng = np.random.default_rng(6)
  tokens = rng.integers(V, size=(2, 5))
  aux = jnp.asarray(rng.standard_normal((2, 5, 3 * D)), jnp.float32)
  chains = [draft_chain(c, c.embed, tokens, aux, 4)
            for c in (ckpt, interop.read_draft(tmp_path / "s"), interop.read_draft(tmp_path / "e2"))]
  assert len({c.tobytes() for c in chains}) == 1 and len(np.unique(chains[0])) > 1


@pytest.mark.slow  # 1-2 minutes on a busy 2-core CPU: compiling a training step and a speculative decode
def test_trained_draft_exports_converts_and_generates_same_tokens(tmp_path):
  """train.py (tiny config) exports; eagle -> speculators -> eagle; speculative decoding with the exported and the
  converted draft emits the same tokens with the same acceptance (greedy output alone could not tell drafts apart)."""
  if not (ROOT / "train.py").exists():
    pytest.skip("train.py (the training CLI) is not in the tree")
  speculative = pytest.importorskip("eagle3_jax.decode.speculative", reason="needs the speculative decoder")
  train_setup = pytest.importorskip("eagle3_jax.train.setup", reason="needs the training loop")
  from eagle3_jax import sharding
  from eagle3_jax.decode import tree
  from eagle3_jax.config import load_config

  overrides = [f"run_dir={tmp_path / 'run'}", "num_steps=3", "eval_every=0", "data.eval_fraction=0",
               "progress=false", "checkpoint_every=1000", "async_checkpointing=false", "mesh.data=-1"]
  script = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
  train_script = importlib.util.module_from_spec(script)
  script.loader.exec_module(train_script)
  exported = pathlib.Path(train_script.main(["--config", str(ROOT / "configs/tiny.py"), *overrides])["export_dir"])
  assert convert.main([str(exported), str(tmp_path / "spec"), "--to", "speculators", "--no-embed"]) == 0
  assert convert.main([str(tmp_path / "spec"), str(tmp_path / "back"), "--to", "eagle"]) == 0
  original, converted = interop.read_draft(exported), interop.read_draft(tmp_path / "back")
  assert_same_ckpt(original, converted)

  cfg = load_config(ROOT / "configs/tiny.py", overrides)
  tcfg, target_params = train_setup.load_target(cfg, sharding.make_mesh(cfg.mesh))
  assert original.aux_layer_ids == tcfg.aux_layer_ids
  target = protocol.llama_target(tcfg)
  spec = speculative.SpecConfig(tree=tree.TreeConfig(top_k=2, depth=3, total_tokens=6), max_new_tokens=12)
  tokens = np.random.default_rng(7).integers(4, tcfg.vocab_size, size=(2, 8))
  outs = [speculative.outputs(speculative.generate(target, target_params, c.params, c.vocab, tokens, np.array([8, 5]),
                                                   jax.random.key(0), dcfg=c.cfg, spec=spec), spec)
          for c in (original, converted)]
  for name in ("tokens", "counts", "rounds", "tau"):
    np.testing.assert_array_equal(outs[0][name], outs[1][name], err_msg=name)
