"""Offline feature store: what is read back equals the online features, the loss agrees, provenance is enforced."""

import dataclasses
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.train import features, ttt
from eagle3_jax.config import LlamaConfig
from eagle3_jax.target import llama, protocol

B, T, PAD = 2, 12, 5  # pad id 5 (not 0): the offline reader pads with 0, which must not matter
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0)  # conftest's tiny_cfg


def _batches(vocab_size, n=3, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(3, T + 1, B).astype(np.int32)
    valid = np.arange(T)[None, :] < lengths[:, None]
    out.append({"tokens": np.where(valid, rng.integers(0, vocab_size, (B, T)), PAD).astype(np.int32),
                "loss_mask": (valid & (rng.random((B, T)) < 0.6)).astype(np.int32), "lengths": lengths})
  return out


@pytest.fixture(scope="module")
def target_and_batches():
  """Module-scoped so the target is built once."""
  return CFG, llama.init_params(CFG, jax.random.key(0)), _batches(CFG.vocab_size)


def _dump(path, cfg, params, batches, dtype, **kw):
  return features.dump_features(path, batches, params, target_cfg=cfg, target_name="tiny-random",
                                dataset="unit-test", dtype=dtype, examples_per_shard=4, **kw)


_online = jax.jit(features.target_features, static_argnums=0)


@jax.jit
def _loss_from(params, aux, hidden, tokens, loss_mask):
  """Teacher + TTT loss of a random draft: the part of a train step that consumes the features."""
  dcfg = draft.DraftConfig.for_target(CFG, draft_vocab_size=64)
  vocab = DraftVocab.from_ids(np.arange(0, 128, 2), 128)
  probs, in_vocab = ttt.teacher(protocol.llama_target(CFG), params, hidden.astype(jnp.float32), vocab)
  return ttt.ttt_loss(draft.init_params(dcfg, jax.random.key(1)), params["embed"], aux.astype(jnp.float32),
                      tokens, loss_mask, probs, in_vocab, cfg=dcfg, steps=3)


def _loss(params, batch, aux, hidden):
  return _loss_from(params, jnp.asarray(aux), jnp.asarray(hidden), jnp.asarray(batch["tokens"]),
                    jnp.asarray(batch["loss_mask"]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offline_features_equal_online(tmp_path, target_and_batches, dtype):
  cfg, params, batches = target_and_batches
  index = _dump(tmp_path, cfg, params, batches, dtype)
  assert index["num_examples"] == 6 and [s["num_examples"] for s in index["shards"]] == [4, 2]
  assert index["aux_layers"] == list(cfg.aux_layer_ids) and index["dtype"] == dtype
  assert index["num_tokens"] == sum(int(b["lengths"].sum()) for b in batches)
  assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries
  store = features.FeatureStore(tmp_path, target_cfg=cfg, target_params=params, dataset="unit-test")
  assert len(store) == 6
  exact = dtype == "float32"
  for batch, got in zip(batches, store.batches(B)):
    aux, hidden = _online(protocol.llama_target(cfg), params, jnp.asarray(batch["tokens"]),
                          jnp.asarray(batch["lengths"]))
    assert got["aux"].shape == (B, T, 3 * cfg.hidden_size) and got["hidden"].shape == (B, T, cfg.hidden_size)
    np.testing.assert_array_equal(got["lengths"], batch["lengths"])
    valid = np.arange(T)[None, :] < batch["lengths"][:, None]
    np.testing.assert_array_equal(got["tokens"][valid], batch["tokens"][valid])
    np.testing.assert_array_equal(got["loss_mask"], batch["loss_mask"])
    for name, online in (("aux", aux), ("hidden", hidden)):
      stored = np.asarray(got[name], np.float32)[valid]
      if exact:
        np.testing.assert_array_equal(stored, np.asarray(online)[valid], err_msg=name)
      else:  # bf16 keeps 8 mantissa bits: relative error <= 2^-9
        np.testing.assert_allclose(stored, np.asarray(online)[valid], rtol=2 ** -8, atol=1e-6, err_msg=name)
      assert not np.any(np.asarray(got[name])[~valid].astype(np.float32))
    loss_on, m_on = _loss(params, batch, aux, hidden)
    loss_off, m_off = _loss(params, got, got["aux"], got["hidden"])
    assert float(m_on["weight_sum"].sum()) > 0
    if exact:
      assert float(loss_off) == float(loss_on)
      np.testing.assert_array_equal(m_off["acc"], m_on["acc"])
    else:
      np.testing.assert_allclose(loss_off, loss_on, rtol=1e-2)


def test_store_for_another_target_or_aux_layers_is_refused(tmp_path, target_and_batches):
  cfg, params, batches = target_and_batches
  _dump(tmp_path, cfg, params, batches[:1], "bfloat16")
  other_params = llama.init_params(cfg, jax.random.key(7))
  with pytest.raises(ValueError, match="target_fingerprint"):
    features.FeatureStore(tmp_path, target_cfg=cfg, target_params=other_params)
  with pytest.raises(ValueError, match="aux_layers"):
    features.FeatureStore(tmp_path, target_cfg=dataclasses.replace(cfg, aux_layers=(1, 2, 3)))
  with pytest.raises(ValueError, match="dataset"):
    features.FeatureStore(tmp_path, dataset="sharegpt")
  with pytest.raises(ValueError, match="seq_len"):
    features.FeatureStore(tmp_path, seq_len=2 * T)
  with pytest.raises(ValueError, match="target_fingerprint"):  # the writer refuses to mix targets too
    _dump(tmp_path, cfg, other_params, batches, "bfloat16", resume=True)
  with pytest.raises(ValueError, match="resume=True"):
    _dump(tmp_path, cfg, params, batches, "bfloat16")
  with pytest.raises(FileNotFoundError):
    features.FeatureStore(tmp_path / "missing")


def test_fingerprint_ignores_storage_dtype_but_not_weights(target_and_batches):
  cfg, params, _ = target_and_batches
  fp = features.target_fingerprint(params, cfg)
  assert features.target_fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), cfg) == fp
  assert features.target_fingerprint(llama.init_params(cfg, jax.random.key(9)), cfg) != fp
  assert features.target_fingerprint(params, dataclasses.replace(cfg, rope_theta=5e5)) != fp


def test_resume_continues_an_interrupted_dump(tmp_path, target_and_batches):
  cfg, params, batches = target_and_batches
  _dump(tmp_path / "full", cfg, params, batches, "float32")
  # A dump killed after one shard (4 examples = 2 batches): the index lists only what was fully written.
  _dump(tmp_path / "part", cfg, params, batches[:2], "float32")
  index = _dump(tmp_path / "part", cfg, params, batches, "float32", resume=True)
  assert index["num_examples"] == 6
  full = features.FeatureStore(tmp_path / "full")
  part = features.FeatureStore(tmp_path / "part")
  part[5]  # opens a shard handle, which must not travel through pickle (grain workers get the store pickled)
  part = pickle.loads(pickle.dumps(part))
  for i in range(6):
    for k, v in full[i].items():
      np.testing.assert_array_equal(part[i][k], v, err_msg=f"{i}:{k}")
  assert json.loads((tmp_path / "part" / "index.json").read_text())["num_examples"] == 6
  shuffled = list(part.batches(B, seed=0))
  assert len(shuffled) == 3
  assert sorted(np.concatenate([b["lengths"] for b in shuffled])) == sorted(
      np.concatenate([b["lengths"] for b in batches]))


def test_bucketed_batches_cover_each_epoch_pad_to_buckets_and_resume(tmp_path):
  """Offline training batches: every example once per epoch, each batch padded to the bucket of its longest row
  (not to seq_len), rows equal to the store's, and a restored position yields the same next batches."""
  cfg, params = CFG, llama.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(1)
  batches = []
  for T_b in (8, 40, 100):  # the dump takes batches of several lengths up to seq_len
    lengths = rng.integers(max(2, T_b // 2), T_b + 1, 4).astype(np.int32)
    valid = np.arange(T_b)[None, :] < lengths[:, None]
    batches.append({"tokens": np.where(valid, rng.integers(0, 128, (4, T_b)), 0).astype(np.int32),
                    "loss_mask": valid.astype(np.int32), "lengths": lengths})
  index = _dump(tmp_path / "s", cfg, params, batches, "float32", seq_len=128)
  assert index["complete"] and index["seq_len"] == 128 and index["num_examples"] == 12
  with pytest.raises(ValueError, match="more than the store's seq_len"):
    _dump(tmp_path / "t", cfg, params, batches, "float32", seq_len=64)
  store = features.FeatureStore(tmp_path / "s", target_cfg=cfg, target_params=params)
  it = features.BucketedBatches(store, 3, seed=0, window=2)
  lengths = store.lengths()
  seen = []
  for _ in range(4):  # one epoch: 12 examples / B=3
    b = next(it)
    T_b = b["tokens"].shape[1]
    assert T_b in features.bucket_lengths(128) and T_b >= b["lengths"].max()
    assert T_b == min(t for t in features.bucket_lengths(128) if t >= b["lengths"].max())
    for row in range(3):
      i = int(np.flatnonzero(lengths == b["lengths"][row])[0]) if (lengths == b["lengths"][row]).sum() == 1 else None
      if i is not None:
        np.testing.assert_array_equal(b["aux"][row], store[i]["aux"][:T_b])
    seen += [tuple(r[:n]) for r, n in zip(b["tokens"], b["lengths"])]
  assert sorted(seen) == sorted(tuple(store[i]["tokens"][:lengths[i]]) for i in range(12))
  state = it.get_state()
  ahead = [next(it) for _ in range(5)]  # crosses into epoch 2, which is reshuffled
  again = features.BucketedBatches(store, 3, seed=0, window=2)
  again.set_state(json.loads(json.dumps(state)))
  for a, b in zip(ahead, (next(again) for _ in range(5))):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="seed"):
    features.BucketedBatches(store, 3, seed=1).set_state(state)
