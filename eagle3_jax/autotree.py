"""The tree that fits the hardware (`--tree auto`): measured round costs, the draft's measured acceptance, and the
predicted tokens/s of every candidate shape, plain decoding included.

Cost model: a short calibration times, inside jitted loops on this machine, the target's decode step, its verify
pass over P tree nodes, the draft's context pass over R rows and its tree expansion per top_k and depth; one real
round anchors what the parts miss (accept, commit, emit, loop). It is cached per machine, target, draft shape,
batch size, cache length and dtype, and recalibrated when any of them changes.

Acceptance model: on the target's own greedy text, the TTT forward of the draft (ttt.ttt_ranks) gives for every
position the rank of the target's token among the draft's candidates at depths 1..D, given depths before were
accepted. A tree shape is modelled as the static tree EAGLE-2's expansion would build from the average per-depth,
per-rank acceptance (top_k frontier per level, the best total_tokens nodes kept); a position accepts the deepest
node of that tree whose rank path its own ranks follow. Greedy acceptance: at T > 0 the real tau differs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax import draft, layers, speculative, tree, ttt
from eagle3_jax.tree import TreeConfig

MAX_DEPTH = 8  # deepest candidate and the depth of the acceptance statistics
MAX_TOP_K = 4  # widest candidate; ranks beyond it count as misses
FORMAT = "eagle3-jax-autotree/1"


# ----- candidates ----------------------------------------------------------------------------------------------


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
  return "none" if tcfg is None else f"{tcfg.top_k}x{tcfg.depth}x{tcfg.total_tokens}"


# ----- acceptance model ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """ranks[n, d]: rank (1 = the draft's first choice) of the target's token at depth d + 1 for drafted position n,
  0 when it is not among the draft's first MAX_TOP_K or not in its vocabulary."""

  ranks: np.ndarray  # int8[N, MAX_DEPTH]
  source: str = ""

  def __post_init__(self):
    if self.ranks.ndim != 2 or self.ranks.shape[0] == 0:
      raise ValueError(f"acceptance ranks must be [positions, depth] with at least one position, got "
                       f"{self.ranks.shape}")

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

  def tau(self, tcfg: TreeConfig) -> float:
    """Predicted tokens per round (accepted + the bonus) for this shape."""
    if tcfg.depth > self.ranks.shape[1]:
      raise ValueError(f"acceptance statistics reach depth {self.ranks.shape[1]}, the tree needs {tcfg.depth}")
    nodes = static_tree(self.rates(tcfg.top_k), tcfg)
    accepted = np.zeros(len(self.ranks))
    prefix = [()] * len(self.ranks)
    alive = np.ones(len(self.ranks), bool)
    for d in range(tcfg.depth):
      prefix = [p + (int(r),) for p, r in zip(prefix, self.ranks[:, d])]
      alive &= np.array([p in nodes for p in prefix])
      accepted += alive
    return 1.0 + float(accepted.mean())

  def save(self, path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    save_file({"ranks": self.ranks.astype(np.int8)}, str(path), metadata={"format": FORMAT, "source": self.source})

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Acceptance":
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
      meta = f.metadata() or {}
      if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an autotree acceptance file (format {meta.get('format')!r})")
      return cls(ranks=f.get_tensor("ranks"), source=meta.get("source", ""))


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


def acceptance(target: speculative.Target, target_params: Any, draft_params: Any, vocab: draft.DraftVocab,
               dcfg: draft.DraftConfig, examples: Sequence[tuple[np.ndarray, np.ndarray]], *, source: str = "",
               depth: int = MAX_DEPTH, max_rank: int = MAX_TOP_K) -> Acceptance:
  """Ranks of the target's tokens under the draft over (tokens, mask) examples whose masked tokens are the
  target's own greedy text: position t counts when token t + 2 (the first the draft proposes from t) is masked;
  depths past the end of the text count as misses (the real round stops there too)."""
  fn = _ranks_fn(target, dcfg, depth, max_rank)
  embed = target.embed(target_params)
  out = []
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
  if not out:
    raise ValueError(f"no usable example for the acceptance model ({source}): none has masked (answer) tokens")
  return Acceptance(ranks=np.concatenate(out, axis=0).astype(np.int8), source=source)


@functools.cache
def _ranks_fn(target: speculative.Target, dcfg: draft.DraftConfig, depth: int, max_rank: int):
  @jax.jit
  def fn(target_params, draft_params, vocab, embed, tokens_BT):
    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = target.init_cache(B, T, embed.dtype)
    run = target.forward_hidden or target.forward  # aux is the second output of both
    _, aux, _ = run(target_params, tokens_BT, positions, cache,
                               layers.cache_causal_mask(jnp.zeros((B,), jnp.int32), T, T))
    return ttt.ttt_ranks(draft_params, embed, aux, tokens_BT, vocab, cfg=dcfg, steps=depth, max_rank=max_rank)

  return fn


# ----- cost model ----------------------------------------------------------------------------------------------

VERIFY_POINTS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32)  # tree nodes P timed; others interpolate linearly
EXPAND_DEPTHS = (1, 4)  # expansion is timed at two depths per top_k; other depths are linear between them
CACHE_LENS = (256, 1024)  # the step is timed at both: attention reads every slot, so cost grows with the cache
PREFILL_LENS = (64, 512)  # prompt tokens per row of the two timed prefills; other lengths are linear


@dataclasses.dataclass(frozen=True)
class Costs:
  """Seconds on this machine at one batch size. At cache length CACHE_LENS[0]: the target's decode step, its verify
  pass for P tree nodes (P + 1 tokens with the root), the draft's context pass for R rows and its expansion per
  (top_k, depth); `extra`: what a real chain / tree round costs beyond those parts (accept, commit, emit, the
  loop), from one real round of each. `slot`: seconds a step gains per extra cache slot. `prefill`: prompt length
  -> seconds of the target's prefill of a batch."""

  step: float
  slot: float
  first_call: dict[str, float]  # "plain" / "chain" / "tree": one-time seconds of a new executable's first run
  prefill: dict[int, float]
  verify: dict[int, float]
  context: dict[int, float]
  expand: dict[int, dict[int, float]]  # top_k -> depth -> seconds
  extra: dict[str, float] = dataclasses.field(default_factory=lambda: {"chain": 0.0, "tree": 0.0})
  meta: dict = dataclasses.field(default_factory=dict)

  @staticmethod
  def _line(table: dict[int, float], x: float) -> float:
    """Piecewise-linear through the measured points, extended linearly past both ends."""
    xs = sorted(table)
    ys = [table[k] for k in xs]
    if len(xs) == 1:
      return ys[0]
    if x <= xs[0] or x >= xs[-1]:
      i = 0 if x <= xs[0] else len(xs) - 2
      return ys[i] + (x - xs[i]) * (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return float(np.interp(x, xs, ys))

  def _at(self, cache_len: int | None) -> float:
    return 0.0 if cache_len is None else (cache_len - CACHE_LENS[0]) * self.slot

  def step_s(self, cache_len: int | None = None) -> float:
    return self.step + self._at(cache_len)

  def prefill_s(self, prompt_len: int) -> float:
    return max(self._line(self.prefill, prompt_len), 0.0)

  def verify_s(self, P: int) -> float:
    return self._line(self.verify, P)

  def context_s(self, R: int) -> float:
    return self._line(self.context, R)

  def expand_s(self, k: int, depth: int) -> float:
    return self._line(self.expand[k], depth)

  def round_s(self, tcfg: TreeConfig, cache_len: int | None = None) -> float:
    return (self.context_s(tcfg.max_accept + 1) + self.expand_s(tcfg.top_k, tcfg.depth)
            + self.verify_s(tcfg.total_tokens) + self.extra["chain" if tcfg.is_chain else "tree"]
            + self._at(cache_len))

  def to_json(self) -> dict:
    ints = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731
    return {"step": self.step, "slot": self.slot, "first_call": dict(self.first_call), "prefill": ints(self.prefill), "verify": ints(self.verify),
            "context": ints(self.context), "expand": {str(k): ints(e) for k, e in self.expand.items()},
            "extra": dict(self.extra), "meta": self.meta}

  @classmethod
  def from_json(cls, obj: dict) -> "Costs":
    ints = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    return cls(step=obj["step"], slot=obj["slot"], first_call=dict(obj["first_call"]), prefill=ints(obj["prefill"]), verify=ints(obj["verify"]),
               context=ints(obj["context"]), expand={int(k): ints(e) for k, e in obj["expand"].items()},
               extra=dict(obj["extra"]), meta=obj.get("meta", {}))


def _time_loop(fn, params: Any, state: Any, n: int, repeats: int = 3, first: list | None = None) -> float:
  """Seconds per iteration of a jitted fori_loop(n) of `fn(params, carry) -> carry`: compiled, run once, then the
  best of `repeats` timed runs, so dispatch and compilation stay out. Weights are arguments, not constants.
  `first`, if given, receives what the first run of the compiled loop cost beyond a later one: XLA:CPU does
  one-time work there (0.75 s for a SmolLM2 decode executable on 2 cores), which an engine pays once per shape."""
  loop = jax.jit(lambda p, s: jax.lax.fori_loop(0, n, lambda i, c: fn(p, c), s)).lower(params, state).compile()
  t0 = time.perf_counter()
  jax.block_until_ready(loop(params, state))
  t_first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(params, state))
    best = min(best, time.perf_counter() - t0)
  if first is not None:
    first.append(max(t_first - best, 0.0))
  return best / n


def machine_key() -> dict:
  """What the costs depend on besides the models: the devices, the host, the software."""
  d = jax.devices()[0]
  cpu = ""
  try:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
  except OSError:
    pass
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "cpus": os.cpu_count(), "cpu": cpu or platform.processor(), "jax": jax.__version__}


def cost_key(target_cfg: Any, dcfg: draft.DraftConfig, *, batch: int, dtype: Any) -> dict:
  return {"format": FORMAT, "machine": machine_key(), "target": repr(target_cfg), "draft": repr(dcfg),
          "batch": int(batch), "cache_lens": CACHE_LENS, "prefill_lens": PREFILL_LENS,
          "dtype": str(jnp.dtype(dtype))}


def calibrate(target: speculative.Target, target_params: Any, draft_params: Any, vocab: draft.DraftVocab,
              dcfg: draft.DraftConfig, *, batch: int, target_cfg: Any = None, n: int = 8, verbose: bool = False,
              anchors: Sequence[TreeConfig] = (TreeConfig.chain(2), TreeConfig(top_k=2, depth=3, total_tokens=4))
              ) -> Costs:
  """Times every part of a round at this batch size (about a minute on 2 CPU cores, mostly compilation), then one
  real round of a chain and of a tree: what those cost beyond their parts is `extra`. The decode step is the
  engine's own (decode.decode_step: forward, sampling, bookkeeping) when target_cfg (a LlamaConfig) is given,
  else the bare forward."""
  B, S = batch, CACHE_LENS[0]
  embed = target.embed(target_params)
  dtype = embed.dtype
  t0 = time.perf_counter()
  log = (lambda *a: print("autotree:", *a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)

  def target_pass(T, S=S, start=None, n=n, repeats=3):
    start = jnp.full((B,), S // 2, jnp.int32) if start is None else start
    tokens = jnp.ones((B, T), jnp.int32)
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    tmask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    mask = layers.tree_cache_mask(start, tmask, S)

    def fn(params, cache):
      logits, _, cache = target.forward(params, tokens, positions, cache, mask)
      return cache  # the carried cache makes every iteration depend on the last; logits feed nothing

    return _time_loop(fn, target_params, target.init_cache(B, S, dtype).replace(lengths=start), n, repeats)

  first_call: dict[str, float] = {}
  step = target_pass(1)
  slot = (target_pass(1, S=CACHE_LENS[1]) - step) / (CACHE_LENS[1] - CACHE_LENS[0])
  if target_cfg is not None:
    plain = []
    step = _decode_step_cost(target_params, target_cfg, batch=B, cache_len=S, n=n, first=plain)
    first_call["plain"] = plain[0]
  zeros = jnp.zeros((B,), jnp.int32)  # a prompt is written from slot 0
  prefill = {T: target_pass(T, S=max(CACHE_LENS[1], T), start=zeros, n=1, repeats=2) for T in PREFILL_LENS}
  verify, floor = {}, step
  for P in VERIFY_POINTS:  # more tokens through the same weights never cost less: a running max smooths noise
    verify[P] = floor = max(floor, target_pass(P + 1))
  log(f"target step {step * 1e3:.1f} ms (+{slot * 1e6:.2f} us a cache slot), prefill",
      {T: round(v * 1e3, 1) for T, v in prefill.items()}, "verify", {P: round(v * 1e3, 1) for P, v in verify.items()})

  L = jnp.full((B,), S // 2, jnp.int32)
  dcache = draft.init_cache(dcfg, B, S, dtype).replace(lengths=L)
  hidden = jnp.zeros((B, dcfg.hidden_size), dtype)

  def context_pass(R):
    emb = jnp.zeros((B, R, dcfg.hidden_size), dtype)
    positions = L[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]
    mask = layers.cache_causal_mask(L, R, S)

    def fn(params, carry):
      cache, h = carry
      out, cache = draft.forward(params, emb, h, positions, cache, mask, cfg=dcfg)
      return cache, out.astype(h.dtype)

    return _time_loop(fn, draft_params, (dcache, jnp.zeros((B, R, dcfg.hidden_size), dtype)), n)

  context = {R: context_pass(R) for R in (2, MAX_DEPTH + 1)}

  def expand_pass(k, depth):
    tcfg = TreeConfig(top_k=k, depth=depth, total_tokens=min(k * depth, TreeConfig(
        top_k=k, depth=depth, total_tokens=k).num_candidates))

    def fn(params, carry):
      cache, h = carry
      t, cache = tree.expand(params[0], params[1], params[2], h, cache, dcfg=dcfg, cfg=tcfg)
      return cache, h + t.scores[:, :1].astype(h.dtype) * 0  # keeps the expansion inside the loop

    return _time_loop(fn, (draft_params, embed, vocab), (dcache, hidden), n)

  expand = {k: {d: expand_pass(k, d) for d in EXPAND_DEPTHS} for k in range(1, MAX_TOP_K + 1)}
  log("context", {R: round(v * 1e3, 2) for R, v in context.items()}, "expand",
      {k: {d: round(v * 1e3, 2) for d, v in e.items()} for k, e in expand.items()})
  parts = Costs(step=step, slot=slot, first_call=first_call, prefill=prefill, verify=verify, context=context, expand=expand)
  extra, meta = {}, {}
  for anchor in anchors:
    kind = "chain" if anchor.is_chain else "tree"
    once = []
    real = _round_cost(target, target_params, draft_params, vocab, dcfg, batch=B, cache_len=S, tcfg=anchor, n=n,
                       first=once)
    first_call[kind] = once[0]
    extra[kind] = max(0.0, real - parts.round_s(anchor))
    meta[f"anchor_{kind}"] = {"shape": shape_str(anchor), "round": real, "parts": parts.round_s(anchor)}
    log(f"anchor round {shape_str(anchor)}: {real * 1e3:.1f} ms, parts {parts.round_s(anchor) * 1e3:.1f} ms")
  if set(extra) != {"chain", "tree"}:
    raise ValueError("calibrate needs one chain and one tree among its anchors")
  meta["seconds"] = time.perf_counter() - t0
  log(f"calibrated in {meta['seconds']:.0f} s")
  first_call.setdefault("plain", min(first_call.values()))
  return dataclasses.replace(parts, extra=extra, meta=meta, first_call=first_call)


def _decode_step_cost(params, cfg, *, batch, cache_len, n, first):
  """Seconds per decode.decode_step (greedy), the vanilla engine's loop body."""
  from eagle3_jax import decode, sampling
  from eagle3_jax.target import llama

  T, M = 16, cache_len - 16
  kw = dict(cfg=cfg, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=M)
  state = jax.jit(functools.partial(decode.prefill, **kw))(
      params, jnp.ones((batch, T), jnp.int32), jnp.full((batch,), T, jnp.int32),
      llama.init_cache(cfg, batch, cache_len, jax.tree.leaves(params)[0].dtype), jax.random.key(0))
  return _time_loop(lambda p, s: decode.decode_step(p, s, **kw), params, state, n, first=first)


def _round_cost(target, target_params, draft_params, vocab, dcfg, *, batch, cache_len, tcfg, n, first=None):
  """Seconds per real spec_round (random prompt, rows kept running so the work per round is constant)."""
  T = 16
  M = cache_len - T - tcfg.total_tokens
  spec = speculative.SpecConfig(tree=tcfg, max_new_tokens=M, cache_len=cache_len)
  embed = target.embed(target_params)
  tokens = jnp.ones((batch, T), jnp.int32)
  lengths = jnp.full((batch,), T, jnp.int32)
  state = speculative.prefill_jit(target, target_params, draft_params, embed, tokens, lengths, jax.random.key(0),
                                  dcfg=dcfg, spec=spec)
  fn = lambda p, s: speculative.spec_round(target, p[0], p[1], p[2], p[3], s, dcfg=dcfg, spec=spec)  # noqa: E731
  return _time_loop(fn, (target_params, draft_params, embed, vocab), state,
                    min(n, max(1, (M - 1) // (tcfg.depth + 1) // 4)), first=first)


def cached_costs(target: speculative.Target, target_params: Any, target_cfg: Any, draft_params: Any,
                 vocab: draft.DraftVocab, dcfg: draft.DraftConfig, *, batch: int,
                 cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> Costs:
  """The calibration for this machine, target, draft shape, batch size and dtype: read from cache_dir (default
  ~/.cache/eagle3_jax/autotree) when one was made for exactly these, else measured and saved."""
  from eagle3_jax.target import loading

  dtype = target.embed(target_params).dtype
  key = json.loads(json.dumps(cost_key(target_cfg, dcfg, batch=batch, dtype=dtype)))  # tuples as stored
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  root = pathlib.Path(cache_dir) if cache_dir is not None else loading.cache_root() / "autotree"
  path = root / f"costs-{digest}.json"
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored.get("key") == key:
      return Costs.from_json(stored["costs"])
  costs = calibrate(target, target_params, draft_params, vocab, dcfg, batch=batch, verbose=verbose,
                    target_cfg=target_cfg if hasattr(target_cfg, "num_layers") else None)
  root.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"key": key, "costs": costs.to_json()}, indent=1))
  os.replace(tmp, path)  # atomic: a killed calibration never leaves a half-written cache entry
  return costs


# ----- choice --------------------------------------------------------------------------------------------------


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
  from eagle3_jax.engine import bucket_length

  order = sorted(int(n) for n in prompt_lengths)
  return [bucket_length(max(order[i:i + batch])) for i in range(0, len(order), batch)]


def predict(costs: Costs, acc: Acceptance, *, batch: int, prompt_lengths: Sequence[int] | None = None,
            max_new_tokens: int = 128, shapes: Sequence[TreeConfig] | None = None) -> list[Prediction]:
  """Predicted tokens/s of plain decoding and of every shape, best first.

  With prompt_lengths, the engine's work is modelled: its batches (length-sorted, bucketed), each prefilled at its
  bucket and decoded with a cache of bucket + max_new_tokens slots, every row running to max_new_tokens (EOS is
  not predicted), plus the first-call cost of each new executable (one per distinct bucket). Without, decoding
  alone at CACHE_LENS[0].
  """
  shapes = candidates(max_depth=min(MAX_DEPTH, acc.ranks.shape[1])) if shapes is None else shapes
  M = max_new_tokens
  buckets = engine_batches(prompt_lengths, batch) if prompt_lengths is not None else None
  n_rows = len(prompt_lengths) if prompt_lengths is not None else batch

  def rate(tau, per_step, once):  # per_step(cache_len) -> seconds of one step or round
    if buckets is None:
      return batch * tau / per_step(None)
    seconds = sum(costs.prefill_s(T) + (M - 1) / tau * per_step(T + M) for T in buckets)
    return n_rows * M / (seconds + once * len(set(buckets)))

  out = [Prediction(None, 1.0, costs.step, rate(1.0, costs.step_s, costs.first_call["plain"]))]
  for tcfg in shapes:
    tau = acc.tau(tcfg)
    once = costs.first_call["chain" if tcfg.is_chain else "tree"]
    out.append(Prediction(tcfg, tau, costs.round_s(tcfg), rate(tau, functools.partial(costs.round_s, tcfg), once)))
  return sorted(out, key=lambda p: -p.tokens_per_s)


def choose(costs: Costs, acc: Acceptance, *, batch: int, prompt_lengths: Sequence[int] | None = None,
           max_new_tokens: int = 128, shapes: Sequence[TreeConfig] | None = None) -> Prediction:
  """The shape predicted fastest (tree None: plain decoding is)."""
  return predict(costs, acc, batch=batch, prompt_lengths=prompt_lengths, max_new_tokens=max_new_tokens,
                 shapes=shapes)[0]


# ----- sources of greedy text and the command line ------------------------------------------------------------

ACCEPTANCE_FILE = "acceptance.safetensors"  # beside a draft: its acceptance statistics, made once


def examples_from_rows(path: str | os.PathLike, tokenizer: Any, *, max_length: int = 2048
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """(tokens, answer mask) of the greedy rows (temperature 0 or unrecorded) of a messages JSONL, e.g. held-out
  regenerated conversations: their assistant turns must be the target's own greedy answers."""
  from eagle3_jax import chat

  encoder = chat.ChatEncoder(tokenizer, max_length=max_length, overflow="drop")
  out = []
  for n, line in enumerate(pathlib.Path(path).read_text(encoding="utf-8").splitlines(), 1):
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


def main(argv: Any = None) -> None:
  import argparse

  ap = argparse.ArgumentParser(prog="python -m eagle3_jax.autotree", description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("acceptance", help=f"measure a draft's acceptance on greedy rows, write DRAFT/{ACCEPTANCE_FILE}")
  a.add_argument("--draft", required=True)
  a.add_argument("--rows", required=True, help="messages JSONL whose assistant turns are the target's greedy text")
  a.add_argument("--target", default=None)
  p = sub.add_parser("predict", help="calibrate (or read the cached calibration) and rank the shapes")
  p.add_argument("--draft", default=None, help="default: the shipped draft")
  p.add_argument("--target", default=None)
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of every modelled request")
  p.add_argument("--top", type=int, default=12)
  args = ap.parse_args(argv)

  from eagle3_jax import drafts, engine
  from eagle3_jax.target import loading

  path = args.draft or str(drafts.default_draft_path())
  cfg, params = loading.load_target(args.target, dtype=jnp.float32)
  cfg, ckpt = engine.load_draft(path, cfg)
  target = speculative.llama_target(cfg)
  dparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ckpt.params)
  if args.cmd == "acceptance":
    examples = examples_from_rows(args.rows, loading.load_tokenizer(args.target))
    acc = acceptance(target, params, dparams, ckpt.vocab, ckpt.cfg, examples,
                     source=f"{pathlib.Path(args.rows).name}: {len(examples)} greedy rows")
    acc.save(pathlib.Path(path) / ACCEPTANCE_FILE)
    rates = acc.rates(1)[:, 0]
    print(f"{len(acc.ranks)} positions; chain acceptance per depth {np.round(rates, 3).tolist()}; "
          f"chain tau {[round(acc.tau(TreeConfig.chain(d)), 3) for d in range(1, 5)]}")
    return
  acc = Acceptance.load(pathlib.Path(path) / ACCEPTANCE_FILE)
  costs = cached_costs(target, params, cfg, dparams, ckpt.vocab, ckpt.cfg, batch=args.batch_size, verbose=True)
  for pred in predict(costs, acc, batch=args.batch_size, prompt_lengths=[args.prompt_len] * args.batch_size,
                      max_new_tokens=args.max_new_tokens)[:args.top]:
    print(json.dumps(pred.as_dict()))


if __name__ == "__main__":
  main()
