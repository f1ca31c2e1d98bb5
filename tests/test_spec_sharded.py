"""Sharded speculative decoding on 8 fake CPU devices (batch on data, heads/MLP/vocab on tensor) == one device."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import spec_oracle
from eagle3_jax.draft import head as draft
from eagle3_jax import sharding
from eagle3_jax.decode import speculative as sp
from eagle3_jax.target import llama
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.target import protocol


def test_sharded_generation_equals_single_device(tiny_cfg):
  assert len(jax.devices()) == 8
  cfg = spec_oracle.bigram_config(tiny_cfg, 16)
  # Context-dependent target + copying draft: trees get accepted, so sharded commits are exercised too.
  tparams = spec_oracle.bigram_target(cfg, 0, context_scale=30.0)
  dcfg, dparams, vocab = spec_oracle.copy_draft(cfg, tparams)
  spec = sp.SpecConfig(tree=TreeConfig(top_k=2, depth=3, total_tokens=6), max_new_tokens=20)
  tokens = np.random.default_rng(0).integers(0, 16, (4, 7))
  lengths = np.array([7, 2, 5, 4])
  target = protocol.llama_target(cfg)
  single = sp.outputs(sp.generate(target, tparams, dparams, vocab, tokens, lengths, jax.random.key(0), dcfg=dcfg,
                                  spec=spec), spec)

  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=1, tensor=2))
  tparams_s = jax.device_put(tparams, sharding.tree_shardings(mesh, llama.param_axes(cfg), tparams))
  dparams_s = jax.device_put(dparams, sharding.tree_shardings(mesh, draft.param_axes(dcfg), dparams))
  assert tparams_s["layers"][0]["wq"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor", None)), 3)
  batch = NamedSharding(mesh, P("data"))
  state = sp.generate(target, tparams_s, dparams_s, vocab, jax.device_put(tokens, batch),
                      jax.device_put(lengths, batch), jax.random.key(0), dcfg=dcfg, spec=spec, mesh=mesh)
  sharded = sp.outputs(state, spec)
  for name in ("tokens", "counts", "rounds"):
    np.testing.assert_array_equal(sharded[name], single[name], err_msg=name)
  assert single["tau"].mean() > 1.2
  # Caches really are split: rows over data, kv heads over tensor.
  split = NamedSharding(mesh, P("data", "tensor", None, None))
  assert state.cache.k[0].sharding.is_equivalent_to(split, 4)
  assert state.draft_cache.k[0].sharding.is_equivalent_to(split, 4)
