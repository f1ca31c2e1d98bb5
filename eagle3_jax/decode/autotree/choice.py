"""The choice: predicted tokens/s of plain decoding and of every candidate shape for a request set, best first."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from eagle3_jax.config.decode import SpecConfig
from eagle3_jax.decode.autotree.acceptance import (
    MAX_DEPTH,
    MAX_TOP_K,
    Acceptance,
    batch_rounds,
    request_rounds,
    walk_tau,
)
from eagle3_jax.decode.autotree.costs import Costs
from eagle3_jax.decode.tree import TreeConfig

TRIALS = 8  # draws of per-request rounds averaged by a continuous-batching prediction
STATIC_TRIALS = 64  # draws of a static batch's rows averaged for its rounds (the slowest row sets them)
# A draft is used only when its predicted gain over plain decoding is larger than the model's own error in that
# gain. Measured on 2 CPU cores in three five-repeat runs (BENCHMARKS.md "Tree choice"), the best draft shape beat
# plain decoding by 13-20% at batch 1 and 10-15% at batch 4 (the 1x1x1 chain each time), and the predicted gain of
# the shapes was off by up to ~0.2 either way before the batch-4 terms were priced (admissions, rounds over long
# caches). 10% (the first margin) chose plain decoding where a draft shape was 20% faster; 5% keeps a coin toss
# (a gain of a few percent, where a misjudged draft costs as much) for plain decoding, which has nothing to misjudge.
MARGIN = 0.05
# Among draft shapes predicted within SHALLOW_TIE of the fastest, the one with the fewest draft levels (then nodes)
# is used. A deeper shape's predicted edge comes from acceptance at deeper levels, compounded, which is what moves
# most when the text is harder than the acceptance file's: on 8 held-out benchmark prompts the walk over-predicted
# chains by 8% at depth 3, 12% at 4 and 13-14% at 5-6, while it predicted the calibration answers themselves within
# 1% (BENCHMARKS.md "Tree choice with the layout priced apart"). Within a few percent, the shallow shape costs the
# least when the acceptance is wrong.
SHALLOW_TIE = 0.03


def candidates(max_depth: int = MAX_DEPTH, max_top_k: int = MAX_TOP_K,
               totals: Sequence[int] = (2, 3, 4, 6, 8, 12, 16, 24, 32)) -> list[TreeConfig]:
  """Chains of depth 1..max_depth and trees top_k 2..max_top_k x depth 2..max_depth x total_tokens in totals."""
  out = [TreeConfig.chain(d) for d in range(1, max_depth + 1)]
  for k in range(2, max_top_k + 1):
    for d in range(2, max_depth + 1):
      for p in totals:
        if k <= p <= TreeConfig(top_k=k, depth=d, total_tokens=k).num_candidates and p >= d:
          out.append(TreeConfig(top_k=k, depth=d, total_tokens=p))
  return out


def shape_str(tcfg: TreeConfig | None) -> str:
  return "none" if tcfg is None else tcfg.shape


@dataclasses.dataclass(frozen=True)
class Prediction:
  tree: TreeConfig | None  # None: plain decoding
  tau: float
  round_s: float  # at CACHE_LENS[0]
  tokens_per_s: float  # all rows of the batch together

  def as_dict(self) -> dict:
    return {"tree": shape_str(self.tree), "tau": round(self.tau, 3), "round_ms": round(self.round_s * 1e3, 2),
            "tokens_per_s": round(self.tokens_per_s, 2)}


def engine_batches(prompt_lengths: Sequence[int], batch: int) -> list[int]:
  """The prompt bucket of each batch the engine forms (sorted by length, `batch` rows each)."""
  from eagle3_jax.decode.engine import bucket_length

  order = sorted(int(n) for n in prompt_lengths)
  return [bucket_length(max(order[i:i + batch])) for i in range(0, len(order), batch)]


def continuous_seconds(costs: Costs, buckets: Sequence[int], rounds: float | Sequence[float], *, slots: int,
                       final_len: Callable[[int], int], max_new_tokens: int, growth: int,
                       per_round: Callable[[int], float], sync_every: int = 16,
                       admit_order: str = "longest", speculative: bool = False,
                       tokens: Sequence[int] | None = None) -> float:
  """Seconds of a continuous batcher (decode/batching.py) serving requests of these prompt buckets, each needing
  `rounds` steps or rounds after its prefill (one number for all, or one per request in admission order) for its
  `tokens` (per request in admission order; default max_new_tokens each):
  admissions in `admit_order` of prompt length, each prefilled alone (one row, costs.admit_s; `speculative`: with
  the draft's pass over the prompt), the slot loop in
  chunks of `sync_every` rounds over all slots (a chunk ends early only when every slot is done), finished slots
  refilled between chunks, and the cache sized before each chunk as the batcher sizes it: batching.cache_size of
  the largest batching.slot_need of the running requests (final_len of their bucket, tokens emitted so far, taken
  as spread evenly over their rounds, and `growth` a chunk) and of the next queued one. The decode layout
  (costs.layout), made once per batcher, is for the caller to add (`predict` does). No first-run cost: the batcher
  compiles each executable ahead of its first call (outside the timed region), and a new batcher whose executables
  came from the compilation cache ran 8 requests within 5% of warm repeats of the same batcher (BENCHMARKS.md "Tree
  choice with the tie rule, layouts kept, longest first"), unlike the static generator's (costs.first_call)."""
  from eagle3_jax.decode.batching import cache_size, slot_need  # deferred, as in predict

  M = max_new_tokens
  per_request = [float(rounds)] * len(buckets) if isinstance(rounds, (int, float)) else [float(r) for r in rounds]
  emits = [M] * len(buckets) if tokens is None else [int(t) for t in tokens]
  order = sorted(buckets, reverse=admit_order == "longest")
  queue = list(zip(order, per_request, emits))[::-1]  # pop() gives the next to admit, as the batcher admits
  # Slots a request needs through the next chunk, from the tokens it has emitted (spread evenly over its rounds).
  need = lambda T, r, m, left: slot_need(final_len(T), M, 1 + (m - 1) * (1 - left / max(r, 1e-9)),  # noqa: E731
                                         growth)
  S = cache_size(need(*queue[-1], queue[-1][1]))
  left: list[float | None] = [None] * slots
  held: list[tuple[int, float, int]] = [(0, 0.0, M)] * slots  # (bucket, rounds, tokens) of each slot's request
  seconds = 0.0
  while queue or any(r is not None for r in left):
    for slot in range(slots):
      if left[slot] is None and queue:
        T, r, m = queue.pop()
        S = max(S, cache_size(need(T, r, m, r)))
        seconds += costs.admit_s(T, speculative)
        left[slot], held[slot] = r, (T, r, m)
    S = cache_size(max([need(*h, x) for h, x in zip(held, left) if x is not None]
                       + ([need(*queue[-1], queue[-1][1])] if queue else [])))
    n = min(sync_every, max(r for r in left if r is not None))
    seconds += math.ceil(n) * per_round(S)
    left = [None if r is None or r <= n else r - n for r in left]
  return seconds


def predict(costs: Costs, acc: Acceptance, *, batch: int, prompt_lengths: Sequence[int] | None = None,
            max_new_tokens: int = 128, shapes: Sequence[TreeConfig] | None = None,
            batching: str = "static", sync_every: int = 16, admit_order: str = "longest",
            first_runs: bool = True) -> list[Prediction]:
  """Predicted tokens/s of plain decoding and of every shape, best first.

  With prompt_lengths, the engine's work is modelled as `batching` runs it. Each answer emits what the draft's
  acceptance file says the target's greedy answers emit (Acceptance.answer_tokens: its stop token, or
  max_new_tokens), so tokens/s counts the tokens a run gives, not n x max_new_tokens, and its rounds are those
  decoding needs over that answer's first positions (Acceptance.answer_rounds). static: its batches
  (length-sorted, bucketed), each prefilled at its bucket and decoded with a cache of bucket + max_new_tokens slots
  until its slowest row (drawn answer) is done, plus the first-call cost of each new executable (one per
  distinct bucket; first_runs=False leaves it out: a process that has run these executables once, as a benchmark's
  repeated passes do). continuous: `continuous_seconds` with `batch` slots, admitting in `admit_order`. Either way the decode layout (costs.layout) is made once per run: generators and slot batchers keep
  it (decode/xla_cpu.KeptLayouts). Without prompt_lengths, decoding alone at CACHE_LENS[0].
  """
  if batching not in ("static", "continuous"):
    raise ValueError(f"batching must be 'static' or 'continuous', got {batching!r}")
  from eagle3_jax.decode import batching as slot_batching  # deferred: decode modules import autotree lazily too
  from eagle3_jax.decode.engine import bucket_length

  shapes = candidates(max_depth=min(MAX_DEPTH, acc.ranks.shape[1])) if shapes is None else shapes
  M = max_new_tokens
  buckets = engine_batches(prompt_lengths, batch) if prompt_lengths is not None else None
  n_rows = len(prompt_lengths) if prompt_lengths is not None else batch
  own = [bucket_length(int(n)) for n in prompt_lengths] if prompt_lengths is not None else None

  # Tokens each request emits: per continuous trial, one draw per request; for static batches, STATIC_TRIALS
  # batches of rows (the slowest row of each sets its rounds).
  continuous = buckets is not None and batching == "continuous"
  emits = [acc.answer_tokens(M, n_rows, seed=t) for t in range(TRIALS)] if continuous else []
  rows_emit = acc.answer_tokens(M, batch * STATIC_TRIALS)
  # With per-answer lengths a request is one of the file's answers (the same draws as its tokens above), decoded
  # over that answer's own first positions (Acceptance.answer_rounds); a file of one text is walked from random
  # starts (acceptance.request_rounds).
  answers = acc.lengths is not None
  draws = [acc.draws(n_rows, seed=t) for t in range(TRIALS)] if continuous and answers else []
  rows = acc.draws(batch * STATIC_TRIALS) if answers else None

  def rate(tau, rounds, per_step, once, final_len, row_rounds, prefill_s=costs.prefill_s, tokens_a_round=1,
           spec=False):
    if buckets is None:
      return batch * tau / per_step(None)
    if continuous:  # the slot batcher's loop costs costs.slot_loop times the calibration's, rounds as steps
      in_slots = lambda S: per_step(S) * costs.slot_loop  # noqa: E731
      seconds = np.mean([continuous_seconds(costs, own, r, slots=batch, final_len=final_len, max_new_tokens=M,
                                            growth=sync_every * tokens_a_round, per_round=in_slots,
                                            sync_every=sync_every, admit_order=admit_order, speculative=spec,
                                            tokens=m)
                         for r, m in zip(row_rounds, emits)])
      return float(np.mean([m.sum() for m in emits])) / (float(seconds) + costs.layout)
    seconds = sum(prefill_s(T) + rounds * per_step(T + M) for T in buckets) + costs.layout
    return n_rows * float(rows_emit.mean()) / (seconds + once * len(set(buckets)) * first_runs)

  plain_final = lambda T: slot_batching.final_len(T, M)  # noqa: E731
  # Plain decoding at batch 1 compiles with XLA's defaults (xla_cpu.compiler_options), its prefill too: priced as
  # the one-row admission is.
  plain_prefill = costs.admit_s if batch == 1 and costs.admit else costs.prefill_s
  # A speculative generator's prefill runs the draft over the prompt too: its share as measured on admissions.
  spec_prefill = lambda T: costs.prefill_s(T) * costs.draft_share(T)  # noqa: E731
  # Plain decoding: one step per token after the first (which comes with the prefill).
  plain_rounds = float((rows_emit.reshape(STATIC_TRIALS, batch).max(axis=1) - 1).mean())
  out = [Prediction(None, 1.0, costs.step, rate(1.0, plain_rounds, costs.step_s, costs.first_call["plain"],
                                                plain_final, [m - 1 for m in emits], plain_prefill))]
  for tcfg in shapes:
    accepted = acc.accepted(tcfg)
    tau = walk_tau(accepted, acc.lengths, M)
    if answers:
      per_answer = acc.answer_rounds(accepted, M)
      rounds = float(per_answer[rows].reshape(STATIC_TRIALS, batch).max(axis=1).mean())
      row_rounds = [per_answer[d] for d in draws]
    else:
      rounds = batch_rounds(accepted, batch=batch, tokens=rows_emit - 1, trials=STATIC_TRIALS)
      row_rounds = [request_rounds(accepted, requests=n_rows, tokens=m - 1, seed=t) for t, m in enumerate(emits)]
    # A round holds a target forward and more, so it never costs less than a plain step, nor its first call less
    # than plain decoding's: measured below that is calibration noise (a busy machine), and must not let a draft
    # that accepts nothing look faster than plain decoding. Ties keep plain decoding (a stable sort, plain first).
    once = max(costs.first_call["chain" if tcfg.is_chain else "tree"], costs.first_call["plain"])
    per_round = lambda L, tcfg=tcfg: max(costs.round_s(tcfg, L), costs.step_s(L))  # noqa: E731
    spec = SpecConfig(tree=tcfg, max_new_tokens=M)
    spec_final = lambda T, spec=spec: max(spec.cache_lengths(T))  # noqa: E731  (spec_batching.final_len)
    # Continuous slots finish when their own request does, so what matters is the spread of rounds across
    # requests (row_rounds above), drawn TRIALS times (fixed seeds) and averaged in `rate`.
    out.append(Prediction(tcfg, tau, per_round(None), rate(tau, rounds, per_round, once, spec_final, row_rounds,
                                                           spec_prefill, tokens_a_round=tcfg.depth + 1, spec=True)))
  return sorted(out, key=lambda p: -p.tokens_per_s)


def choose(costs: Costs, acc: Acceptance, *, batch: int, prompt_lengths: Sequence[int] | None = None,
           max_new_tokens: int = 128, shapes: Sequence[TreeConfig] | None = None, batching: str = "static",
           sync_every: int = 16, margin: float = MARGIN, admit_order: str = "longest",
           first_runs: bool = True) -> Prediction:
  """The shape predicted fastest (the shallowest within SHALLOW_TIE of it: `prefer_shallow`), if it beats plain
  decoding by more than `margin` (a fraction); else plain decoding (tree None). first_runs: as `predict`'s (True
  for a run that pays its executables' first runs, as one infer.py run does; False for a process that has run
  them, a server or a benchmark's repeated passes)."""
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  preds = predict(costs, acc, batch=batch, prompt_lengths=prompt_lengths, max_new_tokens=max_new_tokens,
                  shapes=shapes, batching=batching, sync_every=sync_every, admit_order=admit_order,
                  first_runs=first_runs)
  plain = next(p for p in preds if p.tree is None)
  best = prefer_shallow(preds)
  return best if best.tokens_per_s > plain.tokens_per_s * (1 + margin) else plain


def prefer_shallow(preds: Sequence[Prediction], tie: float = SHALLOW_TIE) -> Prediction:
  """Of draft predictions within `tie` (a fraction) of the fastest, the one with the fewest draft levels, then the
  fewest verified nodes, then the fastest; the fastest when it is plain decoding."""
  top = max(preds, key=lambda p: p.tokens_per_s)
  if top.tree is None:
    return top
  near = [p for p in preds if p.tree is not None and p.tokens_per_s >= top.tokens_per_s * (1 - tie)]
  return min(near, key=lambda p: (p.tree.depth, p.tree.total_tokens, -p.tokens_per_s))
