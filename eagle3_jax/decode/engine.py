"""Host-side serving loop: chat-template tokenisation, length buckets, static batches, any `Generator`, text out."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from eagle3_jax.config import LlamaConfig
from eagle3_jax.decode import sampling, speculative, vanilla, xla_cpu
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.target import protocol


@dataclasses.dataclass
class Batch:
  """Right-padded prompts of one static shape; rows past n_real are dummies whose outputs are dropped."""

  tokens: np.ndarray  # int32[B, T], T = the length bucket
  lengths: np.ndarray  # int32[B]
  n_real: int


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray  # int32[B, M] emitted tokens, pad after counts
  counts: np.ndarray  # int32[B]
  stats: dict[str, float]  # summed over batches by the engine (e.g. target forward passes, compile seconds)
  row_stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # [B] per row, e.g. tau and rounds


class Generator(Protocol):
  """What the engine drives: vanilla decoding here, speculative decoding (--draft) behind the same call."""

  max_new_tokens: int

  def generate(self, batch: Batch) -> GenerateOutput: ...

  @property
  def compile_count(self) -> int: ...


def bucket_length(n: int, minimum: int = 16) -> int:
  """Smallest 2^k or 3 * 2^(k-1) >= n (16, 24, 32, 48, 64, 96, ...): at most 1/3 padding, two shapes per octave."""
  if n < 1:
    raise ValueError(f"prompt length must be >= 1, got {n}")
  n = max(n, minimum)
  p = 1 << (n - 1).bit_length()  # next power of two
  return 3 * p // 4 if 3 * p // 4 >= n else p


class VanillaGenerator:
  """Target-only greedy/sampled decoding; one compiled executable per (batch, bucket) shape."""

  def __init__(self, params: Any, target: protocol.Target | LlamaConfig, *, sampling_cfg: sampling.SamplingConfig,
               max_new_tokens: int, stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0):
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    self.params, self.target, self.max_new_tokens = params, protocol.as_target(target), max_new_tokens
    self._static = dict(target=self.target, sampling_cfg=sampling_cfg, max_new_tokens=max_new_tokens,
                        stop_ids=tuple(sorted(set(int(i) for i in stop_ids))), pad_id=int(pad_id))
    self._key = jax.random.key(seed)
    self._compiled: dict[tuple[int, int], Any] = {}
    self._caches: dict[tuple[int, int], Any] = {}  # donated each call, handed back by the next state
    self._traces_at_start = vanilla.TRACE_COUNT["generate"]
    self._dtype = jax.tree.leaves(params)[0].dtype
    self._laid = xla_cpu.KeptLayouts(self.target, params)  # one decode layout per batch size, not one per batch

  @property
  def compile_count(self) -> int:
    """Traces of the generate function since this generator was built (one per new shape if nothing retraces)."""
    return vanilla.TRACE_COUNT["generate"] - self._traces_at_start

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self._static["stop_ids"]

  def reseed(self, seed: int) -> None:
    """Restart the PRNG stream (regeneration reseeds per chunk so a resumed run samples what a straight one does)."""
    self._key = jax.random.key(seed)

  def generate(self, batch: Batch) -> GenerateOutput:
    B, T = batch.tokens.shape
    S = vanilla.cache_length(T, self.max_new_tokens)
    vanilla.validate(batch.tokens, batch.lengths, target=self.target, cache_len=S, max_new_tokens=self.max_new_tokens)
    stats = {"compile_s": 0.0}
    params = self._laid(B)
    if (B, T) not in self._compiled:
      t0 = time.perf_counter()
      self._caches[B, T] = self.target.init_cache(B, S, self._dtype)
      self._compiled[B, T] = vanilla.generate_jit.lower(
          params, batch.tokens, batch.lengths, self._caches[B, T], self._key,
          **self._static).compile(xla_cpu.compiler_options(rows=B))
      stats["compile_s"] = time.perf_counter() - t0
    state = self._compiled[B, T](params, batch.tokens, batch.lengths, self._caches[B, T], self._key)
    self._caches[B, T], self._key = state.cache, state.key
    tokens, counts, steps = jax.device_get((state.tokens, state.counts, state.steps))
    return GenerateOutput(tokens=tokens, counts=counts, stats=stats | {"target_steps": float(steps) + 1})


class SpeculativeGenerator:
  """EAGLE-3 speculative decoding (speculative.generate_jit) behind the same call; one executable per batch shape.

  Per row it reports rounds and tau (tokens emitted per draft-verify round, bonus included); stats carry the sums
  over real rows (`rounds`, `accepted`), so the engine's summary tau is accepted / rounds over all requests.
  """

  def __init__(self, params: Any, target: protocol.Target | LlamaConfig, draft_params: Any, vocab: DraftVocab, *,
               dcfg: draft.DraftConfig, tree_cfg: TreeConfig, sampling_cfg: sampling.SamplingConfig,
               max_new_tokens: int, stop_ids: Sequence[int] = (), pad_id: int = 0, seed: int = 0,
               embed: Any = None, mesh: Any = None):
    self.params, self.draft_params, self.vocab, self.embed = params, draft_params, vocab, embed
    self.dcfg, self.mesh, self.max_new_tokens = dcfg, mesh, max_new_tokens
    self.target = protocol.as_target(target)
    self.spec = speculative.SpecConfig(tree=tree_cfg, sampling=sampling_cfg, max_new_tokens=max_new_tokens,
                                       stop_ids=tuple(sorted(set(int(i) for i in stop_ids))), pad_id=int(pad_id))
    self._key = jax.random.key(seed)
    self._compiled: dict[tuple[int, int], Any] = {}
    self._traces_at_start = speculative.TRACE_COUNT["generate"]
    self._laid = xla_cpu.KeptLayouts(self.target, params)  # one decode layout per batch size, not one per batch

  @property
  def compile_count(self) -> int:
    return speculative.TRACE_COUNT["generate"] - self._traces_at_start

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.spec.stop_ids

  def reseed(self, seed: int) -> None:
    self._key = jax.random.key(seed)

  def generate(self, batch: Batch) -> GenerateOutput:
    B, T = batch.tokens.shape
    speculative.validate(self.target, self.params, self.draft_params, self.vocab, batch.tokens, batch.lengths,
                         self.embed, dcfg=self.dcfg, spec=self.spec)
    args = (self._laid(B * (self.spec.tree.total_tokens + 1)), self.draft_params, self.vocab, batch.tokens,
            batch.lengths)
    stats = {"compile_s": 0.0}
    if (B, T) not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[B, T] = speculative.generate_jit.lower(
          self.target, *args, self._key, self.embed, dcfg=self.dcfg, spec=self.spec,
          mesh=self.mesh).compile(xla_cpu.compiler_options())
      stats["compile_s"] = time.perf_counter() - t0
    state = self._compiled[B, T](*args, self._key, self.embed)
    self._key = state.key
    out = speculative.outputs(state, self.spec)
    steps = float(jax.device_get(state.steps))
    real = slice(0, batch.n_real)
    return GenerateOutput(
        tokens=out["tokens"], counts=out["counts"],
        stats=stats | {"target_steps": steps + 1, "rounds": float(out["rounds"][real].sum()),
                       "accepted": float(out["accepted"][real].sum())},
        row_stats={"tau": out["tau"], "rounds": out["rounds"]})


def stop_ids(tokenizer: Any, target: str | None) -> list[int]:
  """EOS of the tokenizer plus the eos list of generation_config.json when the target directory has one."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  gen = pathlib.Path(target) / "generation_config.json" if target else None
  if gen is not None and gen.is_file():
    eos = json.loads(gen.read_text()).get("eos_token_id")
    ids.update(int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
  return sorted(ids)


def load_draft(path: str, target: protocol.Target | LlamaConfig) -> tuple[protocol.Target | LlamaConfig, Any]:
  """(the target, tapping the layers the draft was trained on; DraftCheckpoint).

  A LlamaConfig (the bundled family) comes back with the draft's aux layers. A Target's taps were fixed by whoever
  built it and it comes back as it is: they must be the draft's `ckpt.aux_layer_ids`, which only their total width
  can check here (ValueError if the draft reads another aux_size); the file must state its aux layer ids.
  """
  from eagle3_jax import interop  # deferred: interop pulls in the checkpoint formats

  if not (pathlib.Path(path) / "config.json").is_file():
    raise FileNotFoundError(f"--draft {path}: not a draft checkpoint directory (no config.json)")
  if isinstance(target, protocol.Target):
    ckpt = interop.read_draft(path)
    width = ckpt.cfg.num_aux * ckpt.cfg.target_hidden_size
    if width != target.aux_size:
      raise ValueError(f"--draft {path} reads {ckpt.cfg.num_aux} aux states of width {ckpt.cfg.target_hidden_size} "
                       f"({width} in all) but the target's aux_size is {target.aux_size}")
    return target, ckpt
  cfg = target
  ckpt = interop.read_draft(path, num_target_layers=cfg.num_layers)
  aux = tuple(int(i) for i in ckpt.aux_layer_ids)
  if aux != cfg.aux_layer_ids:
    logging.info("--draft %s reads target layers %s (target default %s)", path, aux, cfg.aux_layer_ids)
    cfg = dataclasses.replace(cfg, aux_layers=aux)
  return cfg, ckpt


def make_generator(params: Any, target: protocol.Target | LlamaConfig, *, draft_ckpt: Any = None,
                   tree_cfg: TreeConfig | None = None, dtype: Any = None, slots: int | None = None,
                   admit_order: str | None = None, **common: Any) -> Any:
  """Vanilla decoding, or speculative decoding with a DraftCheckpoint (cast to the target's dtype) and a tree; with
  `slots`, a continuous batcher of that many decode slots (decode/batching.py, admitting in `admit_order`, by
  default batching.DEFAULT_ADMIT_ORDER) instead of static batches. The target is any protocol Target, or a
  LlamaConfig for the bundled family (as `load_draft` returns them)."""
  from eagle3_jax.decode import batching  # deferred: batching imports this module's bucket_length

  admit_order = admit_order or batching.DEFAULT_ADMIT_ORDER

  if draft_ckpt is None:
    return (VanillaGenerator(params, target, **common) if slots is None else
            batching.ContinuousBatcher(params, target, slots=slots, admit_order=admit_order, **common))
  if tree_cfg is None:
    raise ValueError("speculative decoding needs a tree_cfg")
  dtype = dtype or jax.tree.leaves(params)[0].dtype
  cast = lambda x: jax.numpy.asarray(x, dtype)
  draft = dict(vocab=draft_ckpt.vocab, dcfg=draft_ckpt.cfg, tree_cfg=tree_cfg,
               embed=None if draft_ckpt.embed is None else cast(draft_ckpt.embed))
  if slots is not None:
    return batching.ContinuousBatcher(params, target, slots=slots, draft_params=jax.tree.map(cast, draft_ckpt.params),
                                      admit_order=admit_order, **draft, **common)
  return SpeculativeGenerator(params, target, jax.tree.map(cast, draft_ckpt.params), **draft, **common)


@dataclasses.dataclass
class Result:
  index: int  # position in the request list
  text: str
  token_ids: list[int]
  prompt_tokens: int
  seconds: float  # generation wall time of the batch that served this request (shared by its rows)
  stats: dict[str, float] = dataclasses.field(default_factory=dict)  # the generator's row_stats for this row


def _render(tokenizer: Any, request: dict, where: str) -> list[int]:
  if not isinstance(request, dict):
    raise ValueError(f"{where}: a request must be a JSON object, got {type(request).__name__}")
  if "messages" in request:
    messages = request["messages"]
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages):
      raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
  elif "prompt" in request:
    if not isinstance(request["prompt"], str):
      raise ValueError(f"{where}: 'prompt' must be a string")
    if not getattr(tokenizer, "chat_template", None):
      return list(tokenizer.encode(request["prompt"]))
    messages = [{"role": "user", "content": request["prompt"]}]
  else:
    raise ValueError(f"{where}: a request needs 'messages' or 'prompt', got keys {sorted(request)}")
  # Render to text, then encode without extra specials: the template already places BOS where the model wants it.
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return list(tokenizer.encode(text, add_special_tokens=False))


class Engine:
  """Tokenises requests, groups them into static batches by length bucket, runs a Generator, detokenises."""

  def __init__(self, generator: Generator, tokenizer: Any, *, batch_size: int = 1,
               bucket_fn: Callable[[int], int] = bucket_length, pad_id: int = 0):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.generator, self.tokenizer, self.batch_size = generator, tokenizer, batch_size
    self.bucket_fn, self.pad_id = bucket_fn, pad_id

  def encode(self, requests: Sequence[dict]) -> list[list[int]]:
    ids = [_render(self.tokenizer, r, f"request {i}") for i, r in enumerate(requests)]
    for i, x in enumerate(ids):
      if not x:
        raise ValueError(f"request {i} tokenises to an empty prompt")
    return ids

  def batches(self, prompt_ids: Sequence[list[int]]) -> list[tuple[list[int], Batch]]:
    """(request indices, Batch) pairs; sorted by length so a batch shares a bucket and wastes little padding."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out = []
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      T = self.bucket_fn(max(len(prompt_ids[i]) for i in idx))
      tokens = np.full((self.batch_size, T), self.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)  # dummy rows: one pad token, output dropped
      for row, i in enumerate(idx):
        tokens[row, :len(prompt_ids[i])] = prompt_ids[i]
        lengths[row] = len(prompt_ids[i])
      out.append((idx, Batch(tokens=tokens, lengths=lengths, n_real=len(idx))))
    return out

  def run(self, requests: Sequence[dict], *, progress: bool = True,
          max_compiles: int | None = None) -> tuple[list[Result], dict[str, Any]]:
    """Serves every request; returns results in request order and a summary (tokens/s excludes compilation).

    max_compiles is the compile-count check: RuntimeError if the generator traced more often than that.
    """
    from tqdm import tqdm  # deferred: only the CLI path needs it

    t_start = time.perf_counter()
    prompt_ids = self.encode(requests)
    if getattr(self.generator, "continuous", False):
      return self._run_continuous(prompt_ids, progress=progress, max_compiles=max_compiles, t_start=t_start)
    results: list[Result | None] = [None] * len(requests)
    stats: dict[str, float] = {}
    gen_seconds = 0.0
    shapes = set()
    compiles_before = self.generator.compile_count
    bar = tqdm(total=len(requests), desc="requests", unit="req", file=sys.stderr, disable=not progress)
    for idx, batch in self.batches(prompt_ids):
      shapes.add(batch.tokens.shape)
      t0 = time.perf_counter()
      out = self.generator.generate(batch)
      compile_s = out.stats.get("compile_s", 0.0)
      seconds = time.perf_counter() - t0 - compile_s
      gen_seconds += seconds
      for k, v in out.stats.items():
        stats[k] = stats.get(k, 0.0) + float(v)
      for row, i in enumerate(idx):
        ids = [int(t) for t in out.tokens[row, :int(out.counts[row])]]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        results[i] = Result(index=i, text=text, token_ids=ids, prompt_tokens=len(prompt_ids[i]), seconds=seconds,
                            stats={k: v[row].item() for k, v in out.row_stats.items()})
      bar.update(len(idx))
    bar.close()
    compiles = self.generator.compile_count - compiles_before
    if max_compiles is not None and compiles > max_compiles:
      raise RuntimeError(f"generator compiled {compiles} times for {len(shapes)} batch shapes "
                         f"(limit {max_compiles}): something retraces per call")
    n_tokens = sum(len(r.token_ids) for r in results)
    summary = {
        "requests": len(requests), "tokens": n_tokens, "generate_seconds": round(gen_seconds, 4),
        "tokens_per_s": round(n_tokens / gen_seconds, 3) if gen_seconds > 0 else 0.0,
        "wall_seconds": round(time.perf_counter() - t_start, 4), "batch_size": self.batch_size,
        "shapes": sorted(list(s) for s in shapes), "compiles": compiles,
    } | {k: round(v, 4) for k, v in stats.items()}
    # Tokens per draft-verify round, bonus included, over every request; plain decoding emits one per pass.
    summary["tau"] = round(stats["accepted"] / stats["rounds"], 4) if stats.get("rounds") else 1.0
    if not stats.get("rounds") and stats.get("target_steps"):
      # Share of decode slots (batch rows x decode steps) that produced a token; each prefill gave a first token.
      decode_steps = stats["target_steps"] - len(self.batches(prompt_ids))
      summary["utilisation"] = round((n_tokens - len(requests)) / max(decode_steps * self.batch_size, 1), 4)
    summary["batching"] = "static"
    return results, summary

  def _run_continuous(self, prompt_ids: list[list[int]], *, progress: bool, max_compiles: int | None,
                      t_start: float) -> tuple[list[Result], dict[str, Any]]:
    """The same service through a continuous batcher (decode/batching.py): requests finish in their own order."""
    from tqdm import tqdm

    compiles_before = self.generator.compile_count
    bar = tqdm(total=len(prompt_ids), desc="requests", unit="req", file=sys.stderr, disable=not progress)
    produced = [0]
    rows: list[dict[str, float]] = [{} for _ in prompt_ids]  # per request: rounds and tau with a draft

    def finished(i: int, ids: list[int], request_stats: dict[str, float]) -> None:
      rows[i] = request_stats
      produced[0] += len(ids)
      bar.update(1)
      bar.set_postfix(tokens=produced[0], refresh=False)

    token_lists, st = self.generator.run(prompt_ids, on_result=finished)
    bar.close()
    compiles = self.generator.compile_count - compiles_before
    if max_compiles is not None and compiles > max_compiles:
      raise RuntimeError(f"continuous batcher compiled {compiles} times (limit {max_compiles}): something retraces")
    results = [Result(index=i, text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                      prompt_tokens=len(prompt_ids[i]), seconds=st["seconds"], stats=rows[i])
               for i, ids in enumerate(token_lists)]
    n_tokens = sum(len(ids) for ids in token_lists)
    summary = {
        "requests": len(prompt_ids), "tokens": n_tokens, "generate_seconds": round(st["seconds"], 4),
        "tokens_per_s": round(n_tokens / st["seconds"], 3) if st["seconds"] > 0 else 0.0,
        "wall_seconds": round(time.perf_counter() - t_start, 4), "batch_size": self.generator.slots,
        "compiles": compiles, "compile_s": round(st["compile_s"], 4), "target_steps": int(st["steps"]),
        "admissions": int(st["admissions"]), "utilisation": round(st["utilisation"], 4),
        # Tokens per draft-verify round, bonus included, over every request; plain decoding emits one per step.
        "tau": round(st["accepted"] / st["rounds"], 4) if st.get("rounds") else 1.0,
        **({"rounds": st["rounds"], "accepted": st["accepted"]} if "rounds" in st else {}),
        "batching": "continuous"}
    return results, summary
