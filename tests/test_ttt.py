"""TTT loss: scan == Python-unrolled reference, step 0 == plain soft CE, the extended mask, gradients, teacher."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.train import ttt
from eagle3_jax.config import LlamaConfig
from eagle3_jax.train.features import target_features
from eagle3_jax.target import llama, protocol
from eagle3_jax.nn import attention, masks
import ttt_reference

B, T = 3, 10
LENGTHS = np.array([10, 7, 4])
# conftest's tiny_cfg, at module level so the batch fixture below is built once for the whole file.
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0)


@pytest.fixture(scope="module")
def dcfg():
  return draft.DraftConfig.for_target(CFG, draft_vocab_size=48)


def _perturbed(params, key, scale=0.1):
  """Random init plus noise, so norms are not all ones and every path carries signal."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup(dcfg):
  """A right-padded batch (rows of length 10, 7, 4) with real target features and teacher."""
  rng = np.random.default_rng(0)
  target = _perturbed(llama.init_params(CFG, jax.random.key(0)), jax.random.key(1), 0.05)
  params = _perturbed(draft.init_params(dcfg, jax.random.key(2)), jax.random.key(3))
  valid = np.arange(T)[None, :] < LENGTHS[:, None]
  tokens = jnp.asarray(np.where(valid, rng.integers(1, CFG.vocab_size, (B, T)), 0), jnp.int32)
  loss_mask = jnp.asarray(valid & (rng.random((B, T)) < 0.7), jnp.int32)
  aux, hidden = jax.jit(target_features, static_argnums=0)(protocol.llama_target(CFG), target, tokens,
                                                             jnp.asarray(LENGTHS))
  # Keep the target's top-1 tokens in the draft vocab except the rarest one, so in_vocab masks a few positions.
  top, counts = np.unique(np.asarray(jnp.argmax(llama.lm_head(target, hidden, cfg=CFG), -1)),
                          return_counts=True)
  kept = np.delete(top, np.argmin(counts))
  others = np.setdiff1d(np.arange(CFG.vocab_size), top)
  ids = np.concatenate([kept, rng.choice(others, 48 - len(kept), replace=False)])
  vocab = DraftVocab.from_ids(np.sort(ids), CFG.vocab_size)
  probs, in_vocab = ttt.teacher(protocol.llama_target(CFG), target, hidden, vocab)
  assert 0 < int(in_vocab.sum()) < B * T  # the crafted vocab leaves some targets out, so the mask matters
  return dict(params=params, embed=target["embed"], aux=aux, tokens=tokens, loss_mask=loss_mask, probs=probs,
              in_vocab=in_vocab)


def _args(s):
  return (s["params"], s["embed"], s["aux"], s["tokens"], s["loss_mask"], s["probs"], s["in_vocab"])


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("loss_norm", ["batch", "tokens"])
def test_scan_matches_python_reference(setup, dcfg, steps, loss_norm):
  kw = dict(cfg=dcfg, steps=steps, loss_norm=loss_norm)
  loss, m = jax.jit(lambda *a: ttt.ttt_loss(*a, **kw))(*_args(setup))
  ref_loss, ref_m = ttt_reference.ttt_loss_reference(*_args(setup), **kw)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert set(m) == set(ref_m)
  for k in m:
    assert m[k].shape == (steps,)
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(m["weight_sum"][-1]) < float(m["weight_sum"][0]) or steps == 1  # later steps lose the row tails
  np.testing.assert_allclose(loss, np.sum(0.8 ** np.arange(steps) * np.asarray(m["loss"])), rtol=1e-6)


@pytest.mark.parametrize("flags", [dict(norm_before_fc=True), dict(fc_norm=True, norm_output=True),
                                   dict(norm_before_residual=True, norm_output=True), dict(qk_norm=True),
                                   dict(sliding_window=3), dict(num_layers=3, norm_output=True),
                                   dict(head_dim=32, num_heads=2, num_kv_heads=1)],
                         ids=lambda f: "+".join(f))
def test_scan_matches_python_reference_for_each_head_variant(setup, dcfg, flags):
  vcfg = dataclasses.replace(dcfg, **flags)
  s = dict(setup, params=_perturbed(draft.init_params(vcfg, jax.random.key(7)), jax.random.key(8)))
  kw = dict(cfg=vcfg, steps=3)
  loss, m = jax.jit(lambda *a: ttt.ttt_loss(*a, **kw))(*_args(s))
  ref_loss, ref_m = ttt_reference.ttt_loss_reference(*_args(s), **kw)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k in m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
  if "head_dim" in flags:
    return  # another attention shape: the canonical head cannot run these weights
  plain, _ = jax.jit(lambda *a: ttt.ttt_loss(*a, cfg=dcfg, steps=3))(*_args(dict(s, params={
      k: v for k, v in s["params"].items() if k not in ("input_norm", "fc_norm")})))
  assert abs(float(loss) - float(plain)) > 1e-4  # the variant changes the loss: its flags are not ignored


def test_step0_is_plain_soft_cross_entropy(setup, dcfg):
  s = setup
  p, embed = s["params"], s["embed"]
  x_next = jnp.pad(s["tokens"][:, 1:], ((0, 0), (0, 1)))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  out, _ = draft.forward(p, embed[x_next], draft.fuse(p, s["aux"], cfg=dcfg), pos, None,
                         masks.causal_mask(jnp.full((B,), T), T), cfg=dcfg)
  logq = jax.nn.log_softmax(draft.logits(p, out, cfg=dcfg))[:, :T - 2]  # row t predicts x[t+2]
  target = s["probs"][:, 1:T - 1]
  w = s["loss_mask"][:, 2:] * s["in_vocab"][:, 1:T - 1]
  expected = -jnp.sum(w * jnp.sum(target * logq, -1)) / (B * T)
  acc = jnp.sum(w * (jnp.argmax(logq, -1) == jnp.argmax(target, -1))) / jnp.sum(w)
  loss, m = ttt.ttt_loss(*_args(s), cfg=dcfg, steps=1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m["acc"][0], acc, rtol=1e-6)
  _, m_tok = ttt.ttt_loss(*_args(s), cfg=dcfg, steps=1, loss_norm="tokens")
  np.testing.assert_allclose(m_tok["loss"][0], expected * B * T / jnp.sum(w), rtol=1e-5)
  with pytest.raises(ValueError, match="loss_norm"):
    ttt.ttt_loss(*_args(s), cfg=dcfg, steps=1, loss_norm="mean")


def test_extended_mask_is_causal_plus_identities():
  expected = np.array([[1, 0, 0, 1, 0, 0, 1, 0, 0],
                       [1, 1, 0, 0, 1, 0, 0, 1, 0],
                       [1, 1, 1, 0, 0, 1, 0, 0, 1]], bool)
  np.testing.assert_array_equal(masks.ttt_extended_mask(3, 2), expected)


@pytest.mark.parametrize("step", [0, 1, 3])
def test_ttt_attention_equals_dense_extended_mask(step):
  R, N, K, H = 4, 4, 2, 8
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (B, T, N, H))
  kbuf = jax.random.normal(kk, (R, B, T, K, H))
  vbuf = jax.random.normal(kv, (R, B, T, K, H))
  got = attention.ttt_attention(q, kbuf, vbuf, jnp.int32(step))
  keys = jnp.concatenate(list(kbuf[:step + 1]), axis=1)
  vals = jnp.concatenate(list(vbuf[:step + 1]), axis=1)
  mask = jnp.broadcast_to(masks.ttt_extended_mask(T, step), (B, T, (step + 1) * T))
  np.testing.assert_allclose(got, attention.attention(q, attention.head_major(keys), attention.head_major(vals), mask), atol=1e-6)
  # Slots beyond the step (later steps' keys in the scan buffer) must not matter.
  garbage = kbuf.at[step + 1:].set(1e3), vbuf.at[step + 1:].set(-1e3)
  np.testing.assert_allclose(attention.ttt_attention(q, *garbage, step), got, atol=1e-6)


@pytest.fixture(scope="module")
def grads(setup, dcfg):
  """Gradients of the total loss and of step 2's loss alone, remat off and on (one compile per remat mode)."""
  out = {}
  for remat in (False, True):
    def per_step(p, remat=remat):
      loss, m = ttt.ttt_loss(p, *_args(setup)[1:], cfg=dcfg, steps=3, remat=remat)
      return m["loss"]
    pullback = jax.jit(lambda p, ct: jax.vjp(per_step, p)[1](ct)[0])
    out[remat] = (pullback(setup["params"], 0.8 ** jnp.arange(3.0)), pullback(setup["params"], jnp.eye(3)[2]))
  return out


def test_every_trainable_tensor_gets_a_gradient_with_and_without_remat(grads):
  plain, remat = grads[False][0], grads[True][0]
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(plain)]
  assert len(names) == 13  # fc, 2 input norms, q/k/v/o, post-attn norm, 3 mlp, norm, lm_head
  for name, g, gr in zip(names, jax.tree.leaves(plain), jax.tree.leaves(remat)):
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0, name
    np.testing.assert_allclose(gr, g, rtol=1e-5, atol=1e-8, err_msg=name)


def test_later_steps_backpropagate_through_the_chain(grads):
  """Step 2 alone moves fc: only through step-0/1 hidden states and K_0/V_0 (nothing is detached)."""
  for remat in (False, True):
    g = grads[remat][1]
    assert float(jnp.abs(g["fc"]).max()) > 0
    assert float(jnp.abs(g["midlayer"]["hidden_norm"]).max()) > 0


def test_simulated_tau():
  np.testing.assert_allclose(ttt.simulated_tau(jnp.array([0.5, 0.5, 1.0])), 1 + 0.5 + 0.25 + 0.25)
  np.testing.assert_allclose(ttt.simulated_tau(jnp.zeros(7)), 1.0)


# ----- teacher -------------------------------------------------------------------------------------------------


def test_teacher_probs_are_the_renormalised_target_softmax(tiny_cfg):
  rng = np.random.default_rng(1)
  target = llama.init_params(tiny_cfg, jax.random.key(4))
  hidden = jax.random.normal(jax.random.key(5), (B, T, tiny_cfg.hidden_size))
  ids = np.sort(rng.choice(tiny_cfg.vocab_size, 48, replace=False))
  probs, in_vocab = ttt.teacher(protocol.llama_target(tiny_cfg), target, hidden, DraftVocab.from_ids(ids, 128))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  full = jax.nn.softmax(llama.lm_head(target, hidden, cfg=tiny_cfg))
  np.testing.assert_allclose(probs, full[..., ids] / full[..., ids].sum(-1, keepdims=True), rtol=1e-5)
  assert probs.dtype == jnp.float32 and in_vocab.dtype == bool


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [16, 48, 128])
def test_teacher_in_vocab_on_crafted_head(tiny_cfg, tied, chunk):
  cfg = dataclasses.replace(tiny_cfg, tie_word_embeddings=tied)
  D, V = cfg.hidden_size, cfg.vocab_size
  ids = np.arange(0, V, 2)  # even ids form the draft vocab
  # hidden e_d has its argmax at top[d]; d=4 ties ids 15 (out) and 16 (in), across chunks of 16: the first
  # index, 15, must win (as jnp.argmax).
  top = np.array([10, 11, 100, 127, 15, 0])
  head = np.zeros((D, V), np.float32)
  head[np.arange(len(top)), top] = 5.0
  head[4, 16] = 5.0
  params = {"embed": jnp.asarray(head.T)} if tied else {"lm_head": jnp.asarray(head)}
  hidden = jnp.eye(D)[None, :len(top)]
  probs, in_vocab = ttt.teacher(protocol.llama_target(cfg), params, hidden, DraftVocab.from_ids(ids, V),
                                vocab_chunk=chunk)
  np.testing.assert_array_equal(in_vocab[0], [True, False, True, False, False, True])
  assert int(jnp.argmax(probs[0, 0])) == 5  # draft index of target id 10
