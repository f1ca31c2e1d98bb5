"""Test-only models with known behaviour: a bigram target and a draft whose hand-set weights copy it exactly.

Bigram target: e(x) = 7 * one-hot(x) + 1 * (last unit vector), times sqrt(D)/sqrt(50) so every embedding has rms 1
(V <= head_dim < D), every attention
output (wo) and MLP output (w_down) is zero, hence the residual stream at every layer is e(x_p) and the logits at
position p are a function of token p alone. `context_scale` > 0 keeps that fraction of a random wo, which makes the
target depend on its context (then a copying draft only mostly agrees).

Copy draft (honest: a real EAGLE-3 draft run by the engine, only its weights are chosen):
  fc picks the first aux state, so a context row's hidden is h = e(x_p); a tree node's hidden is its parent's output.
  q = k = the same constant vector for every row (read from the embeddings' shared last coordinate), so the score
  depends on the RoPE distance only and peaks at distance 0: each row attends to itself (margin >= 0.5 * lam^2 / 4
  for theta = 10000; siblings share a position but are masked apart);
  kv head 0 carries +emb, kv head 1 carries -hidden, o_proj sums them, so h + o = e(x_{p+1}) and the MLP is zeroed;
  lm_head = the target's lm_head. The draft row (h_p, x_{p+1}) therefore outputs the target's logits at position p+1,
  i.e. its top-1 is the target's greedy next token (sign=-1 proposes the target's least likely tokens instead).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.config import LlamaConfig
from eagle3_jax.target import llama


def bigram_config(base: LlamaConfig, vocab_size: int) -> LlamaConfig:
  if vocab_size > base.head_dim or base.num_kv_heads < 2:
    raise ValueError("the copy construction needs vocab_size <= head_dim and >= 2 kv heads")
  return dataclasses.replace(base, vocab_size=vocab_size, tie_word_embeddings=False)


def bigram_target(cfg: LlamaConfig, seed: int, *, logit_scale: float = 3.0, context_scale: float = 0.0):
  params = llama.init_params(cfg, jax.random.key(seed))
  V, D = cfg.vocab_size, cfg.hidden_size
  rng = np.random.default_rng(seed)
  unit = math.sqrt(D / 50)
  embed = np.zeros((V, D), np.float32)
  embed[np.arange(V), np.arange(V)] = 7 * unit
  embed[:, D - 1] = unit
  lm_head = np.zeros((D, V), np.float32)
  # logits(x) = 7 * unit * lm_head[x]: standard deviation logit_scale.
  lm_head[:V] = rng.normal(size=(V, V)) * logit_scale / (7 * unit)
  params["embed"], params["lm_head"] = jnp.asarray(embed), jnp.asarray(lm_head)
  for layer in params["layers"]:
    layer["wo"] = layer["wo"] * context_scale
    layer["w_down"] = jnp.zeros_like(layer["w_down"])
  return params


def copy_draft(cfg: LlamaConfig, target_params, *, lam: float = 60.0, sign: float = 1.0):
  dcfg = draft.DraftConfig.for_target(cfg)
  D, N, K, H = dcfg.hidden_size, dcfg.num_heads, dcfg.num_kv_heads, dcfg.head_dim
  params = draft.init_params(dcfg, jax.random.key(0))
  i = np.arange(H)
  fc = np.zeros((dcfg.num_aux * D, D), np.float32)
  fc[np.arange(D), np.arange(D)] = 1.0
  shared = math.sqrt(D / 50)  # normalised embeddings' last coordinate, the same for every token
  q = np.zeros((2 * D, N, H), np.float32)
  q[D - 1] = math.sqrt(lam) / shared
  k = np.zeros((2 * D, K, H), np.float32)
  k[D - 1] = math.sqrt(lam) / shared
  v = np.zeros((2 * D, K, H), np.float32)
  v[i, 0, i] = 1.0
  v[D + i, 1, i] = -1.0
  o = np.zeros((N, H, D), np.float32)
  o[0, i, i] = 1.0  # a head reading kv head 0 (+emb)
  o[N // K, i, i] = 1.0  # a head reading kv head 1 (-hidden)
  params["fc"] = jnp.asarray(fc)
  attn = params["midlayer"]["self_attn"]
  attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"] = map(jnp.asarray, (q, k, v, o))
  params["midlayer"]["mlp"]["down_proj"] = jnp.zeros_like(params["midlayer"]["mlp"]["down_proj"])
  params["lm_head"] = sign * target_params["lm_head"]
  return dcfg, params, DraftVocab.identity(cfg.vocab_size)
