"""The embedded SmolLM2-135M-Instruct GGUF: our logits, aux taps and greedy tokens == transformers' GGUF loader."""

import functools
import os

import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp

from eagle3_jax import layers
from eagle3_jax.target import llama, loading

pytestmark = pytest.mark.slow

N_NEW = 64
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper who befriends a seagull."}]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("eagle3_cache")


@pytest.fixture(scope="module")
def ours(cache_dir):
  return loading.load_target(None, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def prompt(cache_dir):
  tok = loading.load_tokenizer(None, cache_dir=cache_dir)
  ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
  ids = np.asarray(ids, np.int32).reshape(-1)
  # The second load reads the saved tokenizer from the cache and must encode identically.
  again = loading.load_tokenizer(None, cache_dir=cache_dir)
  assert again.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                   return_dict=False) == ids.tolist()
  assert tok.decode(ids).startswith("<|im_start|>system")
  return ids[None, :]


@pytest.fixture(scope="module")
def reference():
  """transformers' own GGUF path (dequantise + Q/K un-permute) into its LlamaForCausalLM, fp32.

  AutoModelForCausalLM.from_pretrained(gguf_file=...) would need `accelerate`, which this project does not
  depend on; load_gguf_checkpoint is the function it calls underneath.
  """
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  path = os.fspath(loading.default_target_path())
  hf_cfg = load_gguf_checkpoint(path, return_tensors=False)["config"]
  assert hf_cfg["model_type"] == "llama"
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **{k: v for k, v in hf_cfg.items() if k != "model_type"}, attn_implementation="eager"))
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
  result = model.load_state_dict(tensors, strict=False)
  assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
  model.tie_weights()
  return model.float().eval()


def test_config(ours):
  cfg, params = ours
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 100000.0
  assert llama.count_params(params) == 134_515_008


@functools.partial(jax.jit, static_argnames=("cfg", "n"))
def _greedy(params, prompt_1T, *, cfg, n):
  """Prefill then n-1 single-token steps over a static cache: (prefill logits, prefill aux, n tokens [1, n]).

  One compiled program serves both tests (compiling the 30-layer forward dominates this file's runtime).
  """
  T = prompt_1T.shape[1]
  S = T + n
  cache = llama.init_cache(cfg, 1, S)
  logits, aux, cache = llama.forward(params, prompt_1T, jnp.arange(T)[None], cache,
                                     layers.cache_causal_mask(cache.lengths, T, S), cfg=cfg)
  cache = cache.replace(lengths=cache.lengths + T)

  def step(carry, _):
    tok, cache = carry
    logits, _, cache = llama.forward(params, tok[:, None], cache.lengths[:, None], cache,
                                     layers.cache_causal_mask(cache.lengths, 1, S), cfg=cfg)
    return (jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache.replace(lengths=cache.lengths + 1)), tok

  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  _, toks = jax.lax.scan(step, (first, cache), None, length=n)
  return logits, aux, toks.T


@pytest.fixture(scope="module")
def ours_run(ours, prompt):
  cfg, params = ours
  return jax.tree.map(np.asarray, _greedy(params, jnp.asarray(prompt), cfg=cfg, n=N_NEW))


def test_prefill_logits_and_aux_match_transformers(ours, prompt, reference, ours_run):
  cfg, _ = ours
  logits, aux, _ = ours_run
  with torch.no_grad():
    out = reference(torch.tensor(prompt, dtype=torch.long), output_hidden_states=True)
  ref = out.logits.numpy()  # |logits| reach ~38; the max difference measured is 1.1e-4
  np.testing.assert_allclose(logits, ref, atol=1e-3, rtol=1e-4)
  ref_aux = np.concatenate([out.hidden_states[i].numpy() for i in cfg.aux_layer_ids], axis=-1)
  np.testing.assert_allclose(aux, ref_aux, atol=1e-3, rtol=1e-4)
  assert (logits.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_tokens_match_transformers(prompt, reference, ours_run):
  with torch.no_grad():
    ref = reference.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=N_NEW, do_sample=False,
                             attention_mask=torch.ones_like(torch.tensor(prompt)))
  ref = ref[0, prompt.shape[1]:].numpy()
  assert len(ref) == N_NEW, "the reference stopped early: pick a prompt with a longer answer"
  np.testing.assert_array_equal(ours_run[2][0], ref)
