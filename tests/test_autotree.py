"""autotree: the TTT rank measurement against an unrolled reference, the acceptance model on known rank tables,
the choice with oracle and random drafts, the calibration cache, and `infer.py --tree auto` end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eagle3_jax.decode import autotree
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.train import ttt
from eagle3_jax.decode.autotree import choice as autotree_choice
from eagle3_jax.decode.autotree import costs as autotree_costs
from eagle3_jax.target import llama
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.nn import attention, masks
from eagle3_jax.target import protocol


def _models(tiny_cfg, Vd=96):
  cfg = tiny_cfg
  params = llama.init_params(cfg, jax.random.key(0))
  dcfg = draft.DraftConfig.for_target(cfg, draft_vocab_size=Vd)
  dparams = draft.init_params(dcfg, jax.random.key(1))
  ids = np.sort(np.random.default_rng(0).choice(cfg.vocab_size, Vd, replace=False))
  return cfg, params, dcfg, dparams, DraftVocab.from_ids(ids, cfg.vocab_size)


def test_ttt_ranks_match_unrolled_reference(tiny_cfg):
  cfg, params, dcfg, dparams, vocab = _models(tiny_cfg)
  B, T, R, K = 2, 12, 4, 5
  tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
  aux = jax.random.normal(jax.random.key(3), (B, T, dcfg.num_aux * cfg.hidden_size))
  got = np.asarray(ttt.ttt_ranks(dparams, params["embed"], aux, tokens, vocab, cfg=dcfg, steps=R, max_rank=K))
  # Reference: the obvious loop (as ttt_loss_reference) and numpy ranks.
  x = np.asarray(tokens)
  pad = lambda a, s: np.pad(a[:, s:], ((0, 0), (0, s)))  # noqa: E731
  hidden = draft.fuse(dparams, aux, cfg=dcfg)
  ks, vs = [], []
  ids = np.asarray(vocab.target_ids())
  for j in range(R):
    mask = jnp.broadcast_to(masks.ttt_extended_mask(T, j), (B, T, (j + 1) * T))

    def attend(i, q, k, v):
      ks.append(k)
      vs.append(v)
      return attention.attention(q, attention.head_major(jnp.concatenate(ks, 1)),
                                 attention.head_major(jnp.concatenate(vs, 1)), mask)

    hidden = draft.run_layers(dparams, params["embed"][pad(x, j + 1)], hidden,
                              jnp.broadcast_to(jnp.arange(T) + j, (B, T)), attend, cfg=dcfg)
    logits = np.asarray(draft.logits(dparams, hidden, cfg=dcfg))
    for b in range(B):
      for t in range(T):
        want = 0
        if t + j + 2 < T and x[b, t + j + 2] in ids:
          own = logits[b, t, np.searchsorted(ids, x[b, t + j + 2])]
          r = 1 + int(np.sum(logits[b, t] > own))
          want = r if r <= K else 0
        assert got[j, b, t] == want, (j, b, t)
  assert (got > 0).any()


def test_accepted_nodes_follow_each_positions_rank_path():
  ranks = np.array([[1, 1, 2, 1], [1, 0, 1, 1], [2, 1, 1, 1], [1, 1, 1, 1]], np.int8)
  acc = autotree.Acceptance(ranks)
  assert acc.accepted(TreeConfig.chain(1)).tolist() == [1, 1, 0, 1]
  assert acc.accepted(TreeConfig.chain(3)).tolist() == [2, 1, 0, 3]
  # A top-2 tree that holds every rank path of depth <= 2 accepts the whole leading run within top 2.
  assert acc.accepted(TreeConfig(top_k=2, depth=2, total_tokens=6)).tolist() == [2, 1, 2, 2]
  # The static tree keeps the best-scoring paths: with 2 nodes, (1,) and (1, 1) (rank 1 is the likelier).
  assert autotree.static_tree(acc.rates(2), TreeConfig(top_k=2, depth=2, total_tokens=2)) == {(1,), (1, 1)}


def test_tau_walks_each_answer_as_decoding_does():
  # Decoding starts a round where the last one ended (a + 1 positions on), not at every position: after a miss
  # it lands on the next position, so clustered misses weigh more than their share of positions.
  accepted = np.array([0, 3, 3, 3, 3, 0, 0, 0])
  assert autotree.walk_tau(accepted) == pytest.approx((1 + 4 + 1 + 1 + 1) / 5)  # positions 0, 1, 5, 6, 7
  assert 1 + accepted.mean() == pytest.approx(2.5)  # the uniform mean differs
  # Each answer is walked on its own from its second position: the first is the token the prefill emits.
  assert autotree.walk_tau(accepted, np.array([4, 4])) == pytest.approx((4 + 1 + 1 + 1) / 4)  # 1; 5, 6, 7
  ranks = np.where(accepted[:, None] > np.arange(autotree.MAX_DEPTH), 1, 0).astype(np.int8)
  acc = autotree.Acceptance(ranks, lengths=np.array([4, 4]))
  assert acc.tau(TreeConfig.chain(3)) == pytest.approx(7 / 4)
  assert autotree.Acceptance(ranks).tau(TreeConfig.chain(3)) == pytest.approx(8 / 5)
  with pytest.raises(ValueError, match="lengths"):
    autotree.Acceptance(ranks, lengths=np.array([4, 3]))


def test_acceptance_file_round_trip(tmp_path):
  acc = autotree.Acceptance(np.array([[1, 2], [0, 0], [1, 1]], np.int8), source="unit", lengths=np.array([2, 1]))
  acc.save(tmp_path / "a.safetensors")
  back = autotree.Acceptance.load(tmp_path / "a.safetensors")
  assert back.source == "unit" and np.array_equal(back.ranks, acc.ranks) and back.lengths.tolist() == [2, 1]
  with pytest.raises(ValueError, match="at least one position"):
    autotree.Acceptance(np.zeros((0, 8), np.int8))


def _fake_costs(step=10.0):
  # A machine where a level costs 1, a verified node 0.5 and the round a fixed 2 on top of a decode step.
  return autotree.Costs(step=step, slot=0.001, first_call={"plain": 3.0, "chain": 4.0, "tree": 5.0},
                        prefill={64: 20.0, 512: 100.0}, verify={P: step + 0.5 * P for P in autotree.VERIFY_POINTS},
                        context={2: 1.0, 9: 1.0}, expand={k: {1: 1.0 * k, 4: 4.0 * k} for k in range(1, 5)},
                        extra={"chain": {1: 2.0}, "tree": {1: 2.0}})


def test_tree_extra_is_linear_in_top_k_between_anchors_and_flat_past_them():
  # A 4x2x6 round once cost a third more than top-2 anchors predicted: top-4 anchors have their own table, and
  # top_k = 3 lies between them; depth is held flat past each table's anchors, as top_k is past the widest.
  c = dataclasses.replace(_fake_costs(), extra={"chain": {1: 1.0, 4: 4.0}, "tree": {2: 2.0, 4: 3.0}, "tree4": {2: 6.0}})
  shape = lambda k, d, p: TreeConfig(top_k=k, depth=d, total_tokens=p)  # noqa: E731
  assert c.extra_s(TreeConfig.chain(2)) == pytest.approx(2.0) and c.extra_s(TreeConfig.chain(8)) == 4.0
  assert c.extra_s(shape(2, 3, 6)) == pytest.approx(2.5)
  assert c.extra_s(shape(4, 2, 6)) == pytest.approx(6.0) and c.extra_s(shape(4, 8, 16)) == pytest.approx(6.0)
  assert c.extra_s(shape(3, 2, 6)) == pytest.approx(4.0)  # halfway between 2.0 (top-2, depth 2) and 6.0
  assert c.extra_s(shape(3, 4, 8)) == pytest.approx(4.5)  # between 3.0 and the flat 6.0
  bare = dataclasses.replace(c, extra={"chain": {1: 0.0}, "tree4": {1: 0.0}})
  assert c.round_s(shape(4, 2, 6)) == pytest.approx(bare.round_s(shape(4, 2, 6)) + 6.0)
  only_top2 = _fake_costs()  # calibrations without a top-4 anchor price every tree with the top-2 table
  assert only_top2.extra_s(shape(4, 2, 6)) == only_top2.extra_s(shape(2, 2, 4)) == 2.0
  assert autotree_costs.extra_key(TreeConfig.chain(3)) == "chain" and autotree_costs.extra_key(shape(2, 2, 4)) == "tree"
  assert autotree_costs.extra_key(shape(4, 2, 6)) == "tree4"


def test_choice_oracle_picks_the_deepest_and_random_picks_none():
  oracle = autotree.Acceptance(np.ones((50, autotree.MAX_DEPTH), np.int8))
  best = autotree.choose(_fake_costs(), oracle, batch=1)
  assert best.tree is not None and best.tree.depth == autotree.MAX_DEPTH and best.tau == autotree.MAX_DEPTH + 1
  assert best.tree.is_chain  # every other node is wasted work when the first choice is always right
  rand = autotree.Acceptance(np.zeros((50, autotree.MAX_DEPTH), np.int8))
  assert autotree.choose(_fake_costs(), rand, batch=1).tree is None
  # Prefill enters the rate but not the order.
  preds = autotree.predict(_fake_costs(), oracle, batch=4, prompt_lengths=[10, 300, 20, 40, 50], max_new_tokens=64)
  assert preds[0].tree == best.tree and preds[-1].tokens_per_s > 0
  # The engine's work: two batches (buckets 64 and 384 after sorting), each prefilled and decoded to the limit.
  assert autotree.engine_batches([10, 300, 20, 40, 50], 4) == [64, 384]
  plain = next(p for p in preds if p.tree is None)
  c = _fake_costs()
  seconds = sum(c.prefill_s(T) + 63 * c.step_s(T + 64) for T in (64, 384)) + 2 * c.first_call["plain"]
  assert plain.tokens_per_s == pytest.approx(5 * 64 / seconds)


def test_choice_prefers_the_shallowest_shape_within_the_tie():
  P = autotree.Prediction
  chain = TreeConfig.chain
  tree = TreeConfig(top_k=2, depth=2, total_tokens=4)
  preds = [P(chain(5), 2.6, 0.04, 33.8), P(chain(4), 2.5, 0.04, 33.6), P(chain(3), 2.3, 0.04, 33.4),
           P(tree, 2.2, 0.04, 31.4), P(None, 1.0, 0.03, 28.4)]
  assert autotree.prefer_shallow(preds).tree == chain(3)  # 33.4 is within 3% of 33.8; 2x2x4 (-7%) is not
  assert autotree.prefer_shallow(preds, tie=0.0).tree == chain(5)
  two = [P(chain(2), 2.0, 0.04, 30.0), P(tree, 2.1, 0.04, 30.5)]
  assert autotree.prefer_shallow(two).tree == chain(2)  # same depth: fewer nodes
  assert autotree.prefer_shallow([P(None, 1.0, 0.03, 30.0), P(chain(1), 1.5, 0.04, 29.8)]).tree is None


def test_choice_needs_a_gain_beyond_the_margin():
  # acc_0 = 0.27 on fixed costs (a 20 s step): the 1x1x1 chain is predicted 3.7% faster than plain decoding.
  ranks = np.zeros((100, autotree.MAX_DEPTH), np.int8)
  ranks[:27, 0] = 1
  acc = autotree.Acceptance(ranks, lengths=np.ones(100, np.int32))  # one-position answers: every one is visited
  costs = _fake_costs(step=20.0)
  preds = {autotree.shape_str(p.tree): p for p in autotree.predict(costs, acc, batch=1)}
  gain = max(p.tokens_per_s for p in preds.values()) / preds["none"].tokens_per_s - 1
  assert 0.01 < gain < autotree.MARGIN, gain
  assert autotree.choose(costs, acc, batch=1).tree is None  # within the model's error: plain decoding
  assert autotree.choose(costs, acc, batch=1, margin=0.0).tree is not None  # the raw ranking picks the draft
  assert autotree.choose(costs, acc, batch=1, margin=gain / 2).tree is not None
  with pytest.raises(ValueError, match="margin"):
    autotree.choose(costs, acc, batch=1, margin=-0.1)
  # A cold run pays each new executable's first run: priced for the draft's executables, they can cost its gain.
  slow_first = dataclasses.replace(_fake_costs(step=20.0), first_call={"plain": 0.0, "chain": 1e4, "tree": 1e4})
  ranks_easy = ranks.copy()
  ranks_easy[:, :2] = 1
  easy = autotree.Acceptance(ranks_easy, lengths=np.full(10, 10, np.int32))
  kw = dict(batch=1, prompt_lengths=[10, 10], max_new_tokens=64)
  assert autotree.choose(slow_first, easy, **kw).tree is None
  assert autotree.choose(slow_first, easy, first_runs=False, **kw).tree is not None


def test_slot_cost_grows_with_the_verified_nodes_and_admissions_price_the_draft():
  # Attention reads every cache slot once per token a row carries: a verify pass of P nodes gains more per slot
  # than a step, linearly between the timed node counts, flat past the last, never less than a step.
  c = dataclasses.replace(_fake_costs(), slot=1.0, slot_nodes={3: 1.6, 8: 2.0})
  assert c.slot_s(0) == 1.0 and c.slot_s(3) == pytest.approx(1.6) and c.slot_s(1) == pytest.approx(1.2)
  assert c.slot_s(6) == pytest.approx(1.84) and c.slot_s(32) == pytest.approx(2.0)
  tcfg = TreeConfig.chain(3)
  assert c.round_s(tcfg, autotree.CACHE_LENS[0] + 100) == pytest.approx(c.round_s(tcfg) + 100 * 1.6)
  assert c.step_s(autotree.CACHE_LENS[0] + 100) == pytest.approx(c.step + 100 * 1.0)
  assert dataclasses.replace(c, slot_nodes={3: 0.5}).slot_s(3) == 1.0  # never under a step's
  assert _fake_costs().slot_s(8) == _fake_costs().slot  # calibrations without the table: the step's
  # A speculative admission costs its measured ratio to a plain one, linear between the timed lengths, flat past them.
  a = dataclasses.replace(_fake_costs(), admit={16: 1.0, 64: 2.0, 512: 10.0}, admit_spec={64: 2.2, 512: 10.5})
  assert a.admit_s(64, speculative=True) == pytest.approx(2.2) and a.admit_s(512, True) == pytest.approx(10.5)
  assert a.admit_s(16, True) == pytest.approx(1.1) and a.admit_s(2048, True) == pytest.approx(a.admit_s(2048) * 1.05)
  assert a.admit_s(40) == pytest.approx(1.5)  # the concave short end: from the 16-token timing, not extrapolated
  assert _fake_costs().admit_s(100, True) == _fake_costs().admit_s(100)  # no spec timing: the plain admission
  kw = dict(slots=2, final_len=lambda T: T + 21, max_new_tokens=21, growth=16, sync_every=16)
  plain = autotree.continuous_seconds(a, [16, 64], 20, per_round=lambda S: 1.0, **kw)
  spec = autotree.continuous_seconds(a, [16, 64], 20, per_round=lambda S: 1.0, speculative=True, **kw)
  assert spec - plain == pytest.approx((1.1 - 1.0) + (2.2 - 2.0))


def test_answers_stop_where_the_targets_greedy_answers_stop():
  # 8 held-out prompts at 64 new tokens emitted 458 tokens, not 512: answers end at the target's stop token, and the
  # acceptance file's answers say where. The file's longest answers are taken as cut off by their generation cap.
  ranks = np.zeros((130, autotree.MAX_DEPTH), np.int8)
  acc = autotree.Acceptance(ranks, lengths=np.array([10, 20, 100]))
  got = acc.answer_tokens(64, 3000, seed=1)
  assert set(got.tolist()) == {10, 20, 64} and abs(got.mean() - (10 + 20 + 64) / 3) < 2
  assert set(acc.answer_tokens(16, 100).tolist()) == {10, 16}
  assert (autotree.Acceptance(ranks).answer_tokens(64, 5) == 64).all()  # one text: no answer ends
  # Plain decoding, one request at a time, nothing but steps priced: an answer of m tokens costs m - 1 steps (its
  # first comes with the prefill), so the rate is E[m] / ((E[m] - 1) * step), not 64 / (63 * step).
  c = dataclasses.replace(_fake_costs(), slot=0.0, prefill={64: 0.0, 512: 0.0}, admit={},
                          first_call={"plain": 0.0, "chain": 0.0, "tree": 0.0})
  plain = lambda a: next(p for p in autotree.predict(c, a, batch=1, prompt_lengths=[10] * 6,  # noqa: E731
                                                     max_new_tokens=64) if p.tree is None).tokens_per_s
  m = acc.answer_tokens(64, autotree_choice.STATIC_TRIALS).mean()
  assert plain(acc) == pytest.approx(m / ((m - 1) * c.step))
  assert plain(autotree.Acceptance(ranks)) == pytest.approx(64 / (63 * c.step))
  # Continuous slots: the tokens counted are the answers' own, and short answers free their slot early.
  kw = dict(batch=2, prompt_lengths=[10] * 6, max_new_tokens=64, batching="continuous", shapes=[])
  short = autotree.predict(c, acc, **kw)[0].tokens_per_s
  full = autotree.predict(c, autotree.Acceptance(ranks), **kw)[0].tokens_per_s
  assert short < full  # more of the time is a chunk's slots idling behind the longest answer


def test_answers_are_walked_from_their_start():
  # A run of M new tokens visits each answer's first M positions, and answers start harder than they go on: the 40
  # calibration answers give 1x3x3 chains 2.33 a round whole and 1.91 over their first 64 tokens.
  ranks = np.zeros((30, autotree.MAX_DEPTH), np.int8)
  ranks[5:10, :3] = 1  # answer one (10 positions): hard for its first 5, then the chain's 3 nodes are accepted
  ranks[10:, :3] = 1  # answer two (20 positions, the file's longest: cut off by its cap): easy throughout
  acc = autotree.Acceptance(ranks, lengths=np.array([10, 20]))
  chain = TreeConfig.chain(3)
  accepted = acc.accepted(chain)
  assert acc.emitted(5).tolist() == [5, 5] and acc.emitted(30).tolist() == [10, 30]
  # M = 5: answer one walks positions 1-4 (nothing accepted: 4 rounds); answer two 1 and 5 (4 tokens a round).
  assert acc.answer_rounds(accepted, 5).tolist() == [4, 1]
  # M = 10: answer one goes on from position 5 with 4 tokens a round (5, 9); answer two: 1, 5, 9.
  assert acc.answer_rounds(accepted, 10).tolist() == [6, 3]
  # M = 30: answer two emits 30 tokens but holds 20 positions: its 5 rounds over 19 go on at that rate to 29.
  assert acc.answer_rounds(accepted, 30) == pytest.approx([6, 5 * 29 / 19])
  assert acc.tau(chain, 5) == pytest.approx((4 + 4) / 5)  # answer one: 4 rounds of 1 token; answer two: 1 of 4
  assert acc.tau(chain, 5) < acc.tau(chain, 10) < acc.tau(chain)  # whole answers: the easy part counts fully
  assert acc.tau(chain) == pytest.approx(autotree.walk_tau(accepted, acc.lengths))
  # The prediction walks the same first positions: fewer new tokens, a lower tau and fewer tokens a second.
  c = dataclasses.replace(_fake_costs(), slot=0.0, first_call={"plain": 0.0, "chain": 0.0, "tree": 0.0})
  kw = dict(batch=1, prompt_lengths=[10] * 4, shapes=[chain])
  short, full = (next(p for p in autotree.predict(c, acc, max_new_tokens=M, **kw) if p.tree is not None)
                 for M in (5, 10))
  assert short.tau == pytest.approx(acc.tau(chain, 5)) and short.tau < full.tau


def test_continuous_predictions_price_the_slot_batchers_own_loop():
  # The slot batcher's loop measured 6-12% dearer a step than the calibration's decode loop at the same cache length:
  # continuous predictions take its steps and rounds at costs.slot_loop times the calibrated ones; static ones not.
  free = dict(admit={16: 0.0, 512: 0.0}, prefill={64: 0.0, 512: 0.0}, first_call={"plain": 0.0, "chain": 0.0,
                                                                                   "tree": 0.0})
  c = dataclasses.replace(_fake_costs(), **free)
  slow = dataclasses.replace(c, slot_loop=1.25)
  acc = autotree.Acceptance(np.ones((50, autotree.MAX_DEPTH), np.int8))
  for batching, scale in (("continuous", 1.25), ("static", 1.0)):
    kw = dict(batch=2, prompt_lengths=[10, 20, 30, 40], max_new_tokens=32, batching=batching,
              shapes=[TreeConfig.chain(2)])
    for fast, dear in zip(autotree.predict(c, acc, **kw), autotree.predict(slow, acc, **kw)):
      assert fast.tokens_per_s == pytest.approx(dear.tokens_per_s * scale), (batching, fast, dear)
  assert autotree.Costs.from_json(slow.to_json()).slot_loop == 1.25


def test_slot_cost_is_the_median_of_interleaved_differences():
  # One slow phase during one timing once doubled a calibration's slot cost; the median difference discards it.
  near = iter([1.0, 1.0, 1.0])
  far = iter([1.0 + 768e-3, 1.0 + 2 * 768e-3 * 5, 1.0 + 768e-3 * 1.1])
  got = autotree_costs._slot_cost(lambda: next(near), lambda: next(far))
  assert got == pytest.approx(1.1e-3)


def test_continuous_prediction_follows_the_slot_schedule():
  # Two slots, three requests of 20 rounds (21 tokens) each, chunks of 16, shortest first: admit two (buckets 16,
  # 24), run 16 + 4 (the chunk ends when both are done), admit the third (bucket 48), run 16 + 4 with one slot idle.
  # The cache holds what the running requests need through the next chunk (bucket + tokens so far + 16) and the next
  # queued one at admission (48 + 1 + 16 = 65 -> 96 slots): 96 throughout. (tests/test_batching.py checks the same
  # model against the batcher's own chunks.)
  c = dataclasses.replace(_fake_costs(), admit={64: 2.0, 512: 9.0})
  slots_kw = dict(slots=2, final_len=lambda T: T + 21, max_new_tokens=21, growth=16, sync_every=16)
  got = autotree.continuous_seconds(c, [16, 24, 48], 20, per_round=lambda S: 1.0 + S / 1000, admit_order="shortest",
                                    **slots_kw)
  admits = c.admit_s(16) + c.admit_s(24) + c.admit_s(48)
  assert got == pytest.approx(admits + 40 * (1 + 96 / 1000))
  # The decode layout is made once per run, not per chunk or per static batch (generators keep it).
  laid = dataclasses.replace(c, layout=0.5)
  assert autotree.continuous_seconds(laid, [16, 24, 48], 20, per_round=lambda S: 1.0 + S / 1000,
                                     admit_order="shortest", **slots_kw) == pytest.approx(got)
  lens8 = [10, 20, 30, 40, 50, 60, 70, 80]
  never = autotree.Acceptance(np.ones((50, 8), np.int8))
  seconds = lambda costs: 8 * 128 / autotree.predict(costs, never, batch=4, prompt_lengths=lens8,  # noqa: E731
                                                     shapes=[])[0].tokens_per_s
  assert seconds(laid) == pytest.approx(seconds(c) + 0.5)  # two static batches of four, one layout
  # Per-request rounds, in admission order (shortest prompt first): the chunk ends when both first requests are
  # done (6 rounds), then the third alone runs 16 + 14: its spread, not the mean, sets the tail.
  spread = autotree.continuous_seconds(c, [48, 16, 24], [5, 6, 30], per_round=lambda S: 1.0, admit_order="shortest",
                                       **slots_kw)
  assert spread == pytest.approx(admits + 6 + 16 + 14)

  # Longest first (the default): admit 48 and 24 (cache 96), run 16 + 4, admit 16 with the cache cut to 48
  # (16 + 1 + 16 = 33 slots, then 37 by its last chunk): 20 more rounds.
  longest = autotree.continuous_seconds(c, [16, 24, 48], 20, per_round=lambda S: 1.0 + S / 1000, **slots_kw)
  assert longest == pytest.approx(admits + 20 * (1 + 96 / 1000) + 20 * (1 + 48 / 1000))

  # Through predict: plain decoding with one slot per request serves them side by side, so with no prefill cost
  # to share, continuous batching at batch 4 beats static batches of mixed lengths (one long prompt pads its batch).
  oracle = autotree.Acceptance(np.ones((50, autotree.MAX_DEPTH), np.int8))
  lens = [10, 700, 20, 40, 50, 12, 14, 30]
  static = {autotree.shape_str(p.tree): p for p in autotree.predict(c, oracle, batch=4, prompt_lengths=lens)}
  cont = {autotree.shape_str(p.tree): p for p in autotree.predict(c, oracle, batch=4, prompt_lengths=lens,
                                                                   batching="continuous")}
  assert cont["none"].tokens_per_s > static["none"].tokens_per_s
  assert set(cont) == set(static)
  with pytest.raises(ValueError, match="batching"):
    autotree.predict(c, oracle, batch=4, prompt_lengths=lens, batching="dynamic")


def test_request_rounds_walk_the_measured_positions():
  from eagle3_jax.decode.autotree.acceptance import request_rounds

  assert (request_rounds(np.zeros(40, np.int32), requests=5, tokens=63) == 63).all()  # nothing accepted
  assert (request_rounds(np.full(40, 3, np.int32), requests=5, tokens=63) == 16).all()  # 4 tokens a round
  # Half the text easy (3 accepted), half hard (0): requests starting in different halves differ.
  acc = np.r_[np.full(500, 3), np.zeros(500)].astype(np.int32)
  r = request_rounds(acc, requests=64, tokens=63, seed=1)
  assert r.min() == 16 and r.max() == 63


def _calibrate_args(tiny_cfg):
  cfg, params, dcfg, dparams, vocab = _models(tiny_cfg)
  return protocol.llama_target(cfg), params, cfg, dparams, vocab, dcfg


def test_calibration_is_cached_and_invalidated(tiny_cfg, tmp_path, monkeypatch):
  target, params, cfg, dparams, vocab, dcfg = _calibrate_args(tiny_cfg)
  calls = []
  # The cache is under test here, not the timing (that is the end-to-end test below): a stand-in measurement.
  monkeypatch.setattr(autotree_costs, "calibrate", lambda *a, **k: calls.append(k) or _fake_costs())
  kw = dict(cache_dir=tmp_path)
  first = autotree.cached_costs(target, params, cfg, dparams, vocab, dcfg, batch=1, **kw)
  assert len(calls) == 1 and first == _fake_costs()
  again = autotree.cached_costs(target, params, cfg, dparams, vocab, dcfg, batch=1, **kw)
  assert len(calls) == 1 and again == first  # reused
  autotree.cached_costs(target, params, cfg, dparams, vocab, dcfg, batch=2, **kw)
  assert len(calls) == 2  # another batch size is another calibration
  other = dataclasses.replace(dcfg, draft_vocab_size=64)
  autotree.cached_costs(target, params, cfg, draft.init_params(other, jax.random.key(5)),
                        DraftVocab.from_ids(np.arange(64), cfg.vocab_size), other, batch=1, **kw)
  assert len(calls) == 3  # another draft shape too
  monkeypatch.setattr(autotree_costs, "machine_key", lambda: {"platform": "elsewhere"})
  autotree.cached_costs(target, params, cfg, dparams, vocab, dcfg, batch=1, **kw)
  assert len(calls) == 4  # and another machine
  assert len(list(tmp_path.glob("costs-*.json"))) == 4 and not list(tmp_path.glob("*.tmp"))


def test_random_draft_measured_end_to_end_chooses_plain_decoding(tiny_cfg, tmp_path):
  target, params, cfg, dparams, vocab, dcfg = _calibrate_args(tiny_cfg)
  costs = autotree.cached_costs(target, params, cfg, dparams, vocab, dcfg, batch=1, cache_dir=tmp_path)
  assert costs.step > 0 and costs.verify[32] > 0 and costs.prefill_s(100) > 0 and set(costs.extra) == {"chain", "tree", "tree4"}
  assert set(costs.admit) == set(autotree_costs.ADMIT_LENS) and set(costs.admit_spec) == set(
      autotree_costs.SPEC_ADMIT_LENS) and set(costs.slot_nodes) == set(autotree_costs.VERIFY_SLOT_POINTS)
  assert set(costs.extra["chain"]) == {1, 2, 3, 4}  # every chain depth to 4 anchored
  rng = np.random.default_rng(0)
  examples = [(rng.integers(0, cfg.vocab_size, 40), np.r_[np.zeros(10, bool), np.ones(30, bool)]) for _ in range(4)]
  acc = autotree.acceptance(target, params, dparams, vocab, dcfg, examples)
  assert acc.ranks.shape == (4 * 30, autotree.MAX_DEPTH) and acc.lengths.tolist() == [30] * 4  # t = 8..37: token t + 2 is an answer token
  assert acc.tau(TreeConfig.chain(1)) < 1.2  # a random draft almost never guesses
  assert autotree.choose(costs, acc, batch=1).tree is None
  oracle = autotree.Acceptance(np.ones_like(acc.ranks))
  # With everything accepted a deep shape that holds the whole accepted path pays on these measured costs; exactly how
  # deep is the machine's call (a depth-8 round must cost < 9/8 of a depth-7 one: the Intel VM chose 6-8, the AMD VM
  # of 2026-12-04 chose 5, and single ~1 ms timings on a 2-core VM jitter by more), so the exact-depth property is
  # tested on fixed costs above.
  best = autotree.choose(costs, oracle, batch=1)
  assert best.tree.depth >= autotree.MAX_DEPTH // 2 and best.tau == best.tree.depth + 1, best


def test_calibration_keeps_each_anchors_median_ratio(tiny_cfg, monkeypatch):
  # One slow phase during one anchor's timing once set every batch-4 chain's extra cost; the median of the
  # interleaved repeats must discard it. Real rounds are stood in for (a slow phase on demand), the rest is timed.
  target, params, cfg, dparams, vocab, dcfg = _calibrate_args(tiny_cfg)
  rounds = {"1x1x1": [9.0, 1.0, 1.0], "2x2x4": [2.0, 2.0, 6.0]}  # seconds, in timing order

  def fake_round(*a, tcfg, first=None, keep=None, **k):
    times = iter(rounds[tcfg.shape])
    first.append(0.0)
    keep.append(lambda: next(times))
    return next(times)

  monkeypatch.setattr(autotree_costs, "_round_cost", fake_round)
  anchors = (TreeConfig.chain(1), TreeConfig(top_k=2, depth=2, total_tokens=4))
  costs = autotree_costs.calibrate(target, params, dparams, vocab, dcfg, batch=1, target_cfg=cfg, n=2,
                                   anchors=anchors)
  steps = costs.meta["steps"]
  assert len(steps) == 1 + 2 * autotree_costs.ANCHOR_REPEATS * len(anchors)
  for got, slow in zip(costs.meta["anchors"], (0, 2)):
    assert len(got["ratios"]) == autotree_costs.ANCHOR_REPEATS
    typical = [r for i, r in enumerate(got["ratios"]) if i != slow]
    assert got["round"] == pytest.approx(float(np.median(got["ratios"])) * costs.step)
    ratio = got["round"] / costs.step  # the slow timing is not what counts (a mean would be pulled towards it)
    assert min(typical) * (1 - 1e-9) <= ratio <= max(typical) * (1 + 1e-9)


def test_batch_rounds_wait_for_the_slowest_row():
  from eagle3_jax.decode.autotree.acceptance import batch_rounds

  assert batch_rounds(np.ones(10, np.int32), batch=4, tokens=63) == 32  # 2 tokens a round, no spread
  # Texts of different difficulty: a batch of 4 is likelier than one row to hold a hard one, and waits for it.
  mixed = np.r_[np.zeros(200), np.full(200, 1), np.full(200, 3)].astype(np.int32)
  one, four = batch_rounds(mixed, batch=1, tokens=63), batch_rounds(mixed, batch=4, tokens=63)
  assert 16 < one < four < 63


def test_acceptance_rows_may_hold_line_separators(tmp_path):
  # Regenerated answers contain U+2028; rows end at "\n" only (str.splitlines cut such a row in two).
  from test_data import make_tokenizer

  rows = tmp_path / "rows.jsonl"
  row = {"messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": "one\u2028two three"}]}
  rows.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(dict(row, temperature=1.0)) + "\n",
                  encoding="utf-8")
  examples = autotree.examples_from_rows(rows, make_tokenizer("llama3"))
  assert len(examples) == 1 and examples[0][1].any()  # the greedy row only, with its answer tokens
