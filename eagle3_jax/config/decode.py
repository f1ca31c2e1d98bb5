"""Static decoding settings (hashable: they enter jit): sampling, the draft tree's shape, speculative decoding
and the continuous-batching slot loops (decode/batching.py, decode/spec_batching.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from eagle3_jax.config.model import DraftConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How the next token is chosen. Static: it enters jit as a hashable constant.

  temperature == 0 means greedy (argmax); top_k == 0 and top_p == 1 disable those filters. Filters apply in
  transformers' order: temperature, then top-k, then top-p on what top-k kept.
  """

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be an int >= 0, got {self.top_k!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TreeConfig:
  """Static tree shape. `depth` counts draft levels below the root, so one round emits at most depth + 1 tokens.

  The official EAGLE code's `depth` counts expansion steps after the first level: its depth d is our d + 1.
  Chain (EAGLE-1 style, as in tpu-inference / sglang-jax) is top_k = 1 with total_tokens = depth.
  """

  top_k: int = 4
  depth: int = 4
  total_tokens: int = 16  # P, draft nodes verified per round (the root is extra)

  def __post_init__(self):
    for name in ("top_k", "depth", "total_tokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"TreeConfig.{name} must be an int >= 1, got {value!r}")
    if self.total_tokens > self.num_candidates:
      raise ValueError(
          f"TreeConfig.total_tokens={self.total_tokens} exceeds the {self.num_candidates} candidates that top_k="
          f"{self.top_k}, depth={self.depth} produce (top_k + (depth - 1) * top_k**2): the tree cannot be built")

  @classmethod
  def chain(cls, depth: int) -> "TreeConfig":
    return cls(top_k=1, depth=depth, total_tokens=depth)

  @property
  def shape(self) -> str:
    """"top_k x depth x total_tokens", e.g. "2x3x6"."""
    return f"{self.top_k}x{self.depth}x{self.total_tokens}"

  @property
  def num_candidates(self) -> int:
    return self.top_k + (self.depth - 1) * self.top_k ** 2

  @property
  def max_accept(self) -> int:
    """Deepest node a built tree can hold: draft tokens one round can accept (the bonus comes on top)."""
    return min(self.depth, self.total_tokens)

  @property
  def is_chain(self) -> bool:
    return self.top_k == 1

  def pool_depths(self) -> np.ndarray:
    """[C] depth (1-based level) of every candidate slot in the pool, level by level."""
    return np.concatenate([np.ones(self.top_k, np.int32)] +
                          [np.full(self.top_k ** 2, d, np.int32) for d in range(2, self.depth + 1)])


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecConfig:
  """Static decoding settings. cache_len = target KV slots (None: just enough for the prompt bucket)."""

  tree: TreeConfig = TreeConfig()
  sampling: SamplingConfig = SamplingConfig()
  max_new_tokens: int = 128
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  cache_len: int | None = None

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"SpecConfig.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")

  @property
  def rows(self) -> int:
    """R: draft rows fed back per round (root + accepted nodes), the static size of the context pass."""
    return self.tree.max_accept + 1

  def cache_lengths(self, T: int) -> tuple[int, int]:
    """(target, draft) cache slots for a prompt bucket T: the active-row maximum L = T + M - 2 plus each write."""
    P, k, M = self.tree.total_tokens, self.tree.top_k, self.max_new_tokens
    target = self.cache_len if self.cache_len is not None else T + M + P
    return target, T + M + max(self.rows, (self.tree.depth - 1) * k)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotConfig:
  """Static decoding settings of the slot loop (hashable: they enter jit)."""

  sampling: SamplingConfig = SamplingConfig()
  max_new_tokens: int = 128
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecSlotConfig:
  """Static settings of the speculative slot loop (hashable: they enter jit)."""

  dcfg: DraftConfig
  spec: SpecConfig

  @property
  def max_new_tokens(self) -> int:
    return self.spec.max_new_tokens

  @property
  def pad_id(self) -> int:
    return self.spec.pad_id
