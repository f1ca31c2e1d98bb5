"""Speculative decoding: greedy output == vanilla token for token (random and copying drafts, chain and trees, B = 1
and 4, stops), committed KV == a fresh forward, tau bounds, one compile over 50 rounds, clear errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spec_oracle
from eagle3_jax.decode import vanilla, sampling, speculative as sp
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.target import llama
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.nn import kv_cache, masks
from eagle3_jax.target import protocol

TREES = [TreeConfig.chain(4), TreeConfig(top_k=2, depth=3, total_tokens=6), TreeConfig(top_k=4, depth=4, total_tokens=16)]
tree_id = lambda t: f"k{t.top_k}d{t.depth}n{t.total_tokens}"


def _vanilla(cfg, params, tokens, lengths, max_new, stop_ids=()):
  B, T = tokens.shape
  state = vanilla.generate_jit(params, jnp.asarray(tokens), jnp.asarray(lengths),
                              llama.init_cache(cfg, B, vanilla.cache_length(T, max_new)), jax.random.key(0), target=protocol.llama_target(cfg),
                              sampling_cfg=sampling.SamplingConfig(), max_new_tokens=max_new, stop_ids=stop_ids)
  return np.asarray(state.tokens), np.asarray(state.counts)


def _speculative(cfg, tparams, dcfg, dparams, vocab, tokens, lengths, spec, target=None):
  state = sp.generate(target or protocol.llama_target(cfg), tparams, dparams, vocab, tokens, lengths, jax.random.key(1), dcfg=dcfg,
                      spec=spec)
  return state, sp.outputs(state, spec)


@pytest.fixture
def random_pair(tiny_cfg):
  """tiny_cfg target and a random draft (the worst case for acceptance). Equal configs share compilations."""
  cfg = tiny_cfg
  dcfg = draft.DraftConfig.for_target(cfg, draft_vocab_size=48)
  ids = np.sort(np.random.default_rng(0).choice(cfg.vocab_size, 48, replace=False))
  return (cfg, llama.init_params(cfg, jax.random.key(0)), dcfg, draft.init_params(dcfg, jax.random.key(1)),
          DraftVocab.from_ids(ids, cfg.vocab_size))


PROMPTS = np.random.default_rng(2).integers(0, 128, (4, 9))
LENGTHS = np.array([9, 3, 5, 1])


@pytest.mark.parametrize("tree_cfg", TREES, ids=tree_id)
def test_greedy_equals_vanilla_random_draft(random_pair, tree_cfg):
  cfg, tparams, dcfg, dparams, vocab = random_pair
  spec = sp.SpecConfig(tree=tree_cfg, max_new_tokens=16)
  _, out = _speculative(cfg, tparams, dcfg, dparams, vocab, PROMPTS, LENGTHS, spec)
  want, counts = _vanilla(cfg, tparams, PROMPTS, LENGTHS, 16)
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["counts"], counts)
  assert (out["rounds"] >= 1).all() and (out["tau"] >= 1).all()


def test_greedy_single_row_with_stop_id_through_the_bare_protocol(random_pair):
  """B = 1, a stop id, and a target given only by the protocol's required parts (no forward_hidden / lm_head, no
  cache axes): prefill then takes the full-logits path."""
  cfg, tparams, dcfg, dparams, vocab = random_pair
  bare = protocol.Target(forward=functools.partial(llama.forward, cfg=cfg), init_cache=functools.partial(llama.init_cache, cfg),
                   embed=lambda params: params["embed"], vocab_size=cfg.vocab_size, aux_size=3 * cfg.hidden_size,
                   max_positions=cfg.max_position_embeddings, slot_axis=kv_cache.SLOT_AXIS)
  free, _ = _vanilla(cfg, tparams, PROMPTS, LENGTHS, 16)  # compiled already by the B = 4 test
  stop = int(free[0, 5])  # a token the target really emits mid-way
  tokens, lengths = PROMPTS[:1], LENGTHS[:1]
  want, counts = _vanilla(cfg, tparams, tokens, lengths, 16, stop_ids=(stop,))
  spec = sp.SpecConfig(tree=TREES[1], max_new_tokens=16, stop_ids=(stop,))
  _, out = _speculative(cfg, tparams, dcfg, dparams, vocab, tokens, lengths, spec, target=bare)
  assert counts[0] <= 6 and want[0, counts[0] - 1] == stop
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["counts"], counts)


@pytest.fixture
def context_pair(tiny_cfg):
  """A bigram-plus-attention target (context matters) and a draft that copies its bigram part: partial acceptance."""
  cfg = spec_oracle.bigram_config(tiny_cfg, 16)
  tparams = spec_oracle.bigram_target(cfg, 0, context_scale=30.0)
  return (cfg, tparams, *spec_oracle.copy_draft(cfg, tparams))


ORACLE_ROUNDS = 5
oracle_max_new = lambda tree_cfg: 1 + ORACLE_ROUNDS * (tree_cfg.depth + 1)


def test_greedy_equals_vanilla_accepting_draft_and_commits_kv(context_pair):
  cfg, tparams, dcfg, dparams, vocab = context_pair
  tree_cfg = TREES[2]
  tokens = PROMPTS[:, :7] % cfg.vocab_size
  lengths = np.array([7, 3, 5, 1])
  M = oracle_max_new(tree_cfg)  # the oracle test below reuses these compiled shapes
  state, out = _speculative(cfg, tparams, dcfg, dparams, vocab, tokens, lengths, sp.SpecConfig(tree=tree_cfg,
                                                                                              max_new_tokens=M))
  want, _ = _vanilla(cfg, tparams, tokens, lengths, M)
  np.testing.assert_array_equal(out["tokens"], want)
  assert out["tau"].mean() > 1.5, out["tau"]  # trees were really accepted, so commits were exercised
  # The committed cache of each row == K/V of a fresh forward over prompt + emitted tokens (minus the last, the root).
  seqs = [np.concatenate([tokens[b, :lengths[b]], out["tokens"][b, :M - 1]]) for b in range(len(lengths))]
  n = max(len(x) for x in seqs)
  batch = jnp.asarray(np.stack([np.pad(x, (0, n - len(x))) for x in seqs]))
  B = len(seqs)
  _, _, fresh = jax.jit(llama.forward, static_argnames="cfg")(
      tparams, batch, jnp.broadcast_to(jnp.arange(n), (B, n)), llama.init_cache(cfg, B, n),
      masks.cache_causal_mask(jnp.zeros((B,), jnp.int32), n, n), cfg=cfg)
  for b in range(B):
    L = int(state.cache.lengths[b])
    assert lengths[b] + out["counts"][b] - tree_cfg.depth - 2 <= L <= len(seqs[b])  # a finished row stops moving
    for i in range(cfg.num_layers):
      np.testing.assert_allclose(state.cache.k[i][b, :, :L], fresh.k[i][b, :, :L], atol=1e-4)
      np.testing.assert_allclose(state.cache.v[i][b, :, :L], fresh.v[i][b, :, :L], atol=1e-4)


@pytest.mark.parametrize("tree_cfg", [TREES[0], TREES[2]], ids=tree_id)
def test_tau_is_depth_plus_one_for_an_oracle_draft(tiny_cfg, tree_cfg):
  """Oracle = spec_oracle.copy_draft on a pure bigram target: real draft weights whose top-1 is the target's argmax
  (confident: logit_scale 10 keeps the greedy path inside every reranked tree). Every round accepts all `depth`
  nodes plus the bonus."""
  cfg = spec_oracle.bigram_config(tiny_cfg, 16)
  tparams = spec_oracle.bigram_target(cfg, 1, logit_scale=10.0)
  dcfg, dparams, vocab = spec_oracle.copy_draft(cfg, tparams)
  rounds, M = ORACLE_ROUNDS, oracle_max_new(tree_cfg)
  tokens, lengths = PROMPTS[:, :7] % 16, np.array([7, 3, 5, 1])
  _, out = _speculative(cfg, tparams, dcfg, dparams, vocab, tokens, lengths,
                        sp.SpecConfig(tree=tree_cfg, max_new_tokens=M))
  np.testing.assert_array_equal(out["rounds"], rounds)
  np.testing.assert_array_equal(out["tau"], tree_cfg.depth + 1)
  np.testing.assert_array_equal(out["tokens"], _vanilla(cfg, tparams, tokens, lengths, M)[0])


def test_compile_once_over_50_rounds_and_prompt_lengths(random_pair):
  cfg, tparams, dcfg, dparams, vocab = random_pair
  spec = sp.SpecConfig(tree=TREES[1], max_new_tokens=64)
  target = protocol.llama_target(cfg)
  embed = tparams["embed"]
  before = dict(sp.TRACE_COUNT)
  state = sp.prefill_jit(target, tparams, dparams, embed, jnp.asarray(PROMPTS), jnp.asarray(LENGTHS),
                         jax.random.key(0), dcfg=dcfg, spec=spec)
  for _ in range(50):
    state = sp.round_jit(target, tparams, dparams, embed, vocab, state, dcfg=dcfg, spec=spec)
  assert sp.TRACE_COUNT["round"] - before["round"] == 1
  assert int(state.steps) == 50 and (np.asarray(state.counts) >= 51).all()
  # The whole generate (the shapes of test_greedy_equals_vanilla_random_draft): other prompt lengths in the same
  # bucket and another key do not retrace.
  spec = dataclasses.replace(spec, max_new_tokens=16)
  sp.generate(target, tparams, dparams, vocab, PROMPTS, LENGTHS, jax.random.key(0), dcfg=dcfg, spec=spec)
  traced = sp.TRACE_COUNT["generate"]
  sp.generate(target, tparams, dparams, vocab, PROMPTS, np.array([2, 9, 4, 7]), jax.random.key(5), dcfg=dcfg,
              spec=spec)
  assert sp.TRACE_COUNT["generate"] == traced


def test_bad_inputs_raise(random_pair):
  cfg, tparams, dcfg, dparams, vocab = random_pair
  target = protocol.llama_target(cfg)
  spec = sp.SpecConfig(tree=TREES[1], max_new_tokens=8)
  run = lambda **kw: sp.validate(target, tparams, kw.get("dparams", dparams), kw.get("vocab", vocab),
                                 kw.get("tokens", PROMPTS), kw.get("lengths", LENGTHS), dcfg=kw.get("dcfg", dcfg),
                                 spec=kw.get("spec", spec))
  run()
  with pytest.raises(ValueError, match="too long for the cache"):
    run(spec=dataclasses.replace(spec, cache_len=20))
  with pytest.raises(ValueError, match="empty prompt in rows \\[1\\]"):
    run(lengths=np.array([3, 0, 2, 2]))
  with pytest.raises(ValueError, match="exceed the padded prompt length"):
    run(lengths=np.array([3, 10, 2, 2]))
  wide = dataclasses.replace(dcfg, hidden_size=96, target_hidden_size=96)
  with pytest.raises(ValueError, match="aux"):
    run(dcfg=wide, dparams=draft.abstract_params(wide))
  narrow = dataclasses.replace(dcfg, hidden_size=32)
  with pytest.raises(ValueError, match="draft width and target width differ"):
    run(dcfg=narrow, dparams=draft.abstract_params(narrow))
  with pytest.raises(ValueError, match="does not match the target's vocab_size"):
    run(dcfg=dataclasses.replace(dcfg, vocab_size=256))
  with pytest.raises(ValueError, match="d2t has shape"):
    run(vocab=DraftVocab.identity(cfg.vocab_size))
  with pytest.raises(ValueError, match="param 'lm_head' has shape"):
    run(dcfg=dataclasses.replace(dcfg, draft_vocab_size=40))
  with pytest.raises(ValueError, match="sliding_window=6 must exceed tree depth"):
    run(dcfg=dataclasses.replace(dcfg, sliding_window=6))
  with pytest.raises(ValueError, match="sliding_window must be None or an int >= 1"):
    dataclasses.replace(dcfg, sliding_window=0)
  with pytest.raises(ValueError, match="cannot be built"):
    sp.SpecConfig(tree=TreeConfig(top_k=2, depth=2, total_tokens=7))


VARIANTS = [dict(norm_before_fc=True), dict(fc_norm=True, norm_output=True),
            dict(norm_before_residual=True, norm_before_fc=True, norm_output=True), dict(qk_norm=True),
            dict(sliding_window=10),  # rows reach position 20: the window cuts the draft's context
            dict(num_layers=2, norm_output=True),  # prefill runs the full draft pass for layer 1's K/V
            dict(head_dim=32, num_heads=2, num_kv_heads=1)]  # the draft's own attention shape (target: 4x16, 2 kv)


@pytest.mark.parametrize("flags", VARIANTS, ids=lambda f: "+".join(f))
def test_greedy_equals_vanilla_for_each_head_variant(random_pair, flags):
  """The peers' head variants through the context pass, tree expansion and verify: still lossless."""
  cfg, tparams, _, _, vocab = random_pair
  dcfg = dataclasses.replace(draft.DraftConfig.for_target(cfg, draft_vocab_size=48), **flags)
  leaves, tree = jax.tree.flatten(draft.init_params(dcfg, jax.random.key(4)))
  keys = jax.random.split(jax.random.key(5), len(leaves))  # norms away from ones, so every variant path matters
  dparams = jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  spec = sp.SpecConfig(tree=TREES[2], max_new_tokens=12)
  _, out = _speculative(cfg, tparams, dcfg, dparams, vocab, PROMPTS, LENGTHS, spec)
  want, counts = _vanilla(cfg, tparams, PROMPTS, LENGTHS, 12)
  np.testing.assert_array_equal(out["tokens"], want)
  np.testing.assert_array_equal(out["counts"], counts)
