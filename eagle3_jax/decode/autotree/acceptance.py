"""The acceptance model: how often the target takes the draft's rank-r candidate at each depth, measured on the
target's own greedy text, and the tau a tree shape gets from it.

On greedy text the fed tokens are exactly the accepted path, so the TTT forward of the draft (ttt.ttt_ranks) gives
for every position the rank of the target's token among the draft's candidates at depths 1..D, given the depths
before were accepted. A tree shape is modelled as the static tree EAGLE-2's expansion would build from the
average per-depth, per-rank acceptance (top_k frontier per level, the best total_tokens nodes kept); a position
accepts the deepest node of that tree whose rank path its own ranks follow, so correlations along a text count.

tau is not the mean over all positions: decoding visits only the positions its rounds start from (a round that
accepts a nodes moves a + 1 positions on, so a round starts right after each miss), and misses cluster in hard
passages, so the positions it visits are harder than the average one. The uniform mean over-predicted real 1x3x3
chains by 8% (2.53 against 2.34 measured on the same 40 answers); walking each answer as decoding does predicted 2.33
(BENCHMARKS.md "Teacher-forced acceptance against real chains"). And a run of M new tokens visits only the first M
positions of each answer, where answers are harder than further on (the same 40 answers: 1x3x3 accepts 1.91 a round
over their first 64 tokens, 2.33 over their whole 256), so a prediction walks each answer's first M positions
(`Acceptance.answer_rounds`; 1.909 predicted against 1.911 measured at 64 new tokens). Greedy acceptance: at T > 0
the real tau differs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.interop import files
from eagle3_jax.nn import masks
from eagle3_jax.target import protocol
from eagle3_jax.train import ttt

MAX_DEPTH = 8  # deepest candidate and the depth of the acceptance statistics
MAX_TOP_K = 4  # widest candidate; ranks beyond it count as misses
FORMAT = "eagle3-jax-autotree/1"
ACCEPTANCE_FILE = "acceptance.safetensors"  # beside a draft: its acceptance statistics, made once


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """ranks[n, d]: rank (1 = the draft's first choice) of the target's token at depth d + 1 for drafted position n,
  0 when it is not among the draft's first MAX_TOP_K or not in its vocabulary."""

  ranks: np.ndarray  # int8[N, MAX_DEPTH]
  source: str = ""
  # int32[E]: positions of each example (answer) in order, summing to N; None: one text (files made before them).
  lengths: np.ndarray | None = None

  def __post_init__(self):
    if self.ranks.ndim != 2 or self.ranks.shape[0] == 0:
      raise ValueError(f"acceptance ranks must be [positions, depth] with at least one position, got "
                       f"{self.ranks.shape}")
    if self.lengths is not None and (np.ndim(self.lengths) != 1 or np.any(np.asarray(self.lengths) < 1)
                                     or int(np.sum(self.lengths)) != len(self.ranks)):
      raise ValueError(f"acceptance lengths must be positive and sum to the {len(self.ranks)} positions, got "
                       f"{np.asarray(self.lengths).tolist()[:8]}... (sum {int(np.sum(self.lengths))})")

  def rates(self, top_k: int) -> np.ndarray:
    """[D, top_k]: P(rank at depth d = r | depths before d were accepted within top_k)."""
    D = self.ranks.shape[1]
    alive = np.ones(len(self.ranks), bool)
    out = np.zeros((D, top_k))
    for d in range(D):
      r = self.ranks[alive, d]
      if len(r):
        out[d] = [(r == i + 1).mean() for i in range(top_k)]
      alive &= (self.ranks[:, d] >= 1) & (self.ranks[:, d] <= top_k)
    return out

  def accepted(self, tcfg: TreeConfig) -> np.ndarray:
    """[N] draft nodes position n would have accepted with this shape (the bonus not counted)."""
    if tcfg.depth > self.ranks.shape[1]:
      raise ValueError(f"acceptance statistics reach depth {self.ranks.shape[1]}, the tree needs {tcfg.depth}")
    nodes = static_tree(self.rates(tcfg.top_k), tcfg)
    accepted = np.zeros(len(self.ranks), np.int32)
    prefix = [()] * len(self.ranks)
    alive = np.ones(len(self.ranks), bool)
    for d in range(tcfg.depth):
      prefix = [p + (int(r),) for p, r in zip(prefix, self.ranks[:, d])]
      alive &= np.array([p in nodes for p in prefix])
      accepted += alive
    return accepted

  def emitted(self, max_new_tokens: int) -> np.ndarray:
    """[E] tokens each answer of this file emits at max_new_tokens, its stop token included: the target's own greedy
    answers stop where they stop (8 held-out prompts at 64 new tokens emitted 458 of 512 tokens, where the file's
    answers give 90.6%), at most max_new_tokens. Answers of the file's longest length are taken as cut off by the cap
    they were generated under, so they run to max_new_tokens. Needs per-answer lengths."""
    M = int(max_new_tokens)
    L = np.asarray(self.lengths, np.int64)
    return np.where(L >= L.max(), M, np.minimum(L, M))

  def draws(self, requests: int, seed: int = 0) -> np.ndarray:
    """[requests] answers of this file (indices) standing for a run's requests, drawn with a fixed seed."""
    return np.random.default_rng(seed).integers(0, len(self.lengths), size=requests)

  def answer_tokens(self, max_new_tokens: int, requests: int, seed: int = 0) -> np.ndarray:
    """[requests] tokens each of `requests` answers emits (`emitted` of the answers `draws` gives); without
    per-answer lengths every answer runs to max_new_tokens."""
    if self.lengths is None:
      return np.full(requests, int(max_new_tokens), np.int64)
    return self.emitted(max_new_tokens)[self.draws(requests, seed)]

  def answer_rounds(self, accepted: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """[E] rounds decoding needs for each answer's `emitted` tokens, walking that answer's own first positions (a
    round at position s moves 1 + accepted[s] on, from its second position: the first is the prefill's). A run of M
    new tokens visits only the first M positions of each answer, and answers start harder than they go on: 1x3x3
    chains accept 2.33 a round over the 40 calibration answers whole, 1.91 over their first 64 tokens; priced on
    whole answers, 8 held-out prompts at 64 new tokens were over-predicted at every shape (BENCHMARKS.md "Tree
    choice, answers walked from their start"). A capped answer shorter than what it must emit goes on at its own
    rate."""
    M = int(max_new_tokens)
    L = np.asarray(self.lengths, np.int64)
    tokens = self.emitted(M)
    rounds = np.zeros(len(L))
    for e, start in enumerate(np.cumsum(np.r_[0, L[:-1]])):
      end = start + min(int(L[e]), M)
      walked, rounds[e] = _walk(accepted, start + 1, end)
      walked = min(walked, end - start - 1)  # positions covered; a last round past the end emits nothing more
      if tokens[e] - 1 > walked:
        rounds[e] *= (tokens[e] - 1) / max(walked, 1)
    return rounds

  def tau(self, tcfg: TreeConfig, max_new_tokens: int | None = None) -> float:
    """Predicted tokens per round (accepted + the bonus) for this shape, walking each answer (its first
    max_new_tokens positions) as decoding does."""
    return walk_tau(self.accepted(tcfg), self.lengths, max_new_tokens)

  def save(self, path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    tensors = {"ranks": self.ranks.astype(np.int8)}
    if self.lengths is not None:
      tensors["lengths"] = np.asarray(self.lengths, np.int32)
    files.atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                                   metadata={"format": FORMAT, "source": self.source}))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Acceptance":
    tensors, meta = files.read_safetensors(path)
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path}: not an autotree acceptance file (format {meta.get('format')!r})")
    return cls(ranks=tensors["ranks"], source=meta.get("source", ""), lengths=tensors.get("lengths"))


def _walk(accepted: np.ndarray, first: int, end: int) -> tuple[int, int]:
  """(tokens emitted, rounds) of decoding walking one answer's positions first .. end - 1: a round at position s
  emits 1 + accepted[s] tokens (the last may run past the end) and the next starts that many positions on."""
  pos, rounds = first, 0
  while pos < end:
    pos, rounds = pos + 1 + int(accepted[pos]), rounds + 1
  return pos - first, rounds


def walk_tau(accepted: np.ndarray, lengths: np.ndarray | None = None, max_new_tokens: int | None = None) -> float:
  """Tokens per round of decoding that walks each answer: a round at position s emits 1 + accepted[s] tokens and
  the next round starts that many positions on. An answer's first position is the token the prefill emits (no
  round drafts it), so each walk starts at its second, and with max_new_tokens ends at its first max_new_tokens
  positions (what a run of that many new tokens visits); without lengths the positions are one text from the
  first."""
  bounds = np.cumsum([0] + ([len(accepted)] if lengths is None else [int(n) for n in lengths]))
  tokens = rounds = 0
  for start, end in zip(bounds[:-1], bounds[1:]):
    if max_new_tokens is not None and lengths is not None:
      end = min(end, start + int(max_new_tokens))
    t, r = _walk(accepted, start + (1 if lengths is not None and end - start > 1 else 0), end)
    tokens, rounds = tokens + t, rounds + r
  return tokens / rounds


def batch_rounds(accepted: np.ndarray, *, batch: int, tokens: int | np.ndarray, trials: int = 64,
                 seed: int = 0) -> float:
  """Expected rounds a batch of `batch` rows needs until every row has its tokens (one number, or [batch * trials]
  per row: answers stop where they stop), each row walking the measured positions from a random start
  (request_rounds): the batch runs as long as its slowest row, so at batch > 1 this exceeds tokens / tau (a fixed
  seed, `trials` batches averaged). All trials walk at once: one walk per trial cost predict 30 s over the ~100
  candidate shapes."""
  rounds = request_rounds(accepted, requests=batch * trials, tokens=tokens, seed=seed)
  return float(rounds.reshape(trials, batch).max(axis=1).mean())


def request_rounds(accepted: np.ndarray, *, requests: int, tokens: int | np.ndarray, seed: int = 0) -> np.ndarray:
  """[requests] rounds each of `requests` answers needs for its `tokens` tokens (one number for all, or one per
  answer), each walking the measured positions
  from a random start as decoding does (a round that accepts a nodes moves a + 1 positions on): neighbouring
  positions come from the same text, so a hard answer stays hard and the spread across requests is kept, which
  sets when the last slot of a continuous batch finishes."""
  rng = np.random.default_rng(seed)
  N = len(accepted)
  pos = rng.integers(0, N, size=requests)
  gained = np.zeros(requests, np.int64)
  rounds = np.zeros(requests, np.int64)
  tokens = np.broadcast_to(np.asarray(tokens, np.int64), (requests,))
  for _ in range(int(tokens.max(initial=0))):  # every round gives >= 1 token: `tokens` rounds always suffice
    live = gained < tokens
    if not live.any():
      break
    step = 1 + accepted[pos]
    gained += np.where(live, step, 0)
    rounds += live
    pos = (pos + step) % N
  return rounds


def static_tree(rates_DK: np.ndarray, tcfg: TreeConfig) -> set[tuple[int, ...]]:
  """The rank paths EAGLE-2's expansion keeps when every node's score is its path's expected acceptance:
  level 1 the top_k ranks, each further level the top_k children of the top_k best nodes of the level above,
  then the best total_tokens of all candidates (ties to the earlier candidate, as lax.top_k)."""
  k = tcfg.top_k
  frontier = [((r + 1,), float(rates_DK[0, r])) for r in range(k)]
  pool = list(frontier)
  for d in range(1, tcfg.depth):
    level = [(p + (r + 1,), v * float(rates_DK[d, r])) for p, v in frontier for r in range(k)]
    pool += level
    frontier = sorted(level, key=lambda x: -x[1])[:k]  # stable: ties keep pool order
  keep = sorted(range(len(pool)), key=lambda i: -pool[i][1])[:tcfg.total_tokens]
  return {pool[i][0] for i in keep}


def acceptance(target: protocol.Target, target_params: Any, draft_params: Any, vocab: DraftVocab,
               dcfg: draft.DraftConfig, examples: Sequence[tuple[np.ndarray, np.ndarray]], *, source: str = "",
               depth: int = MAX_DEPTH, max_rank: int = MAX_TOP_K) -> Acceptance:
  """Ranks of the target's tokens under the draft over (tokens, mask) examples whose masked tokens are the
  target's own greedy text: position t counts when token t + 2 (the first the draft proposes from t) is masked;
  depths past the end of the text count as misses (the real round stops there too)."""
  fn = _ranks_fn(target, dcfg, depth, max_rank)
  embed = target.embed(target_params)
  out, lengths = [], []
  for tokens, mask in examples:
    tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
    T = int(len(tokens))
    if T < 3 or not mask[2:].any():
      continue
    Tb = max(64, 1 << (T - 1).bit_length())  # power-of-two buckets: a handful of compiles
    padded = np.zeros((1, Tb), np.int32)
    padded[0, :T] = tokens
    ranks = np.asarray(fn(target_params, draft_params, vocab, embed, jnp.asarray(padded)))[:, 0, :T]  # [D, T]
    want = np.zeros(T, bool)
    want[:T - 2] = mask[2:]
    ranks = np.where(np.arange(T)[None, :] + np.arange(depth)[:, None] + 2 < T, ranks, 0)
    out.append(ranks[:, want].T)
    lengths.append(int(want.sum()))
  if not out:
    raise ValueError(f"no usable example for the acceptance model ({source}): none has masked (answer) tokens")
  return Acceptance(ranks=np.concatenate(out, axis=0).astype(np.int8), source=source,
                    lengths=np.asarray(lengths, np.int32))


@functools.cache
def _ranks_fn(target: protocol.Target, dcfg: draft.DraftConfig, depth: int, max_rank: int):
  @jax.jit
  def fn(target_params, draft_params, vocab, embed, tokens_BT):
    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = target.init_cache(B, T, embed.dtype)
    run = target.forward_hidden or target.forward  # aux is the second output of both
    _, aux, _ = run(target_params, tokens_BT, positions, cache,
                               masks.cache_causal_mask(jnp.zeros((B,), jnp.int32), T, T))
    return ttt.ttt_ranks(draft_params, embed, aux, tokens_BT, vocab, cfg=dcfg, steps=depth, max_rank=max_rank)

  return fn


def examples_from_rows(path: str | os.PathLike, tokenizer: Any, *, max_length: int = 2048
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(tokens, answer mask) of the greedy rows (temperature 0 or unrecorded) of a messages JSONL, e.g. held-out
  regenerated conversations: their assistant turns must be the target's own greedy answers."""
  from eagle3_jax.train import chat

  encoder = chat.ChatEncoder(tokenizer, max_length=max_length, overflow="drop")
  out = []
  # Rows end at "\n" only: str.splitlines would also cut at U+2028 and friends, which answers contain.
  for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").split("\n"), 1):
    if not line.strip():
      continue
    row = json.loads(line)
    if float(row.get("temperature", 0.0) or 0.0) != 0.0:
      continue
    enc = encoder(row)
    if enc["status"] == chat.OK and int(np.sum(enc["loss_mask"])) > 2:
      out.append((np.asarray(enc["tokens"]), np.asarray(enc["loss_mask"], bool)))
  if not out:
    raise ValueError(f"{path}: no greedy conversation rows (messages with assistant turns, temperature 0)")
  return out


def examples_from_outputs(prompt_ids: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(prompt + greedy answer, answer mask) pairs from a greedy run of the target (e.g. engine results)."""
  return [(np.asarray(list(p) + list(a), np.int32), np.r_[np.zeros(len(p), bool), np.ones(len(a), bool)])
          for p, a in zip(prompt_ids, answers) if len(a) > 2]
