"""The shapes of the two models: the Llama-family target (LlamaConfig, with RopeScaling) and the EAGLE-3 draft
head (DraftConfig, every published variant as flags); draft/head.py and target/llama.py run them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling (rope_type "llama3")."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """Shape and numerics of a Llama-family target (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3).

  Static: it enters jit as a hashable constant, so every field must be a plain value or tuple.
  """

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2/2.5: bias on q, k, v projections.
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  max_position_embeddings: int = 4096
  # Residual stream entering these layers is returned as the EAGLE-3 aux features ("input" numbering,
  # i.e. HF output_hidden_states indices). None means the official default (2, L//2, L-3).
  aux_layers: tuple[int, ...] | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
    for i in self.aux_layer_ids:  # id num_layers: the residual leaving the last layer (speculators' final hidden)
      if not 0 <= i <= self.num_layers:
        raise ValueError(f"LlamaConfig.aux_layers entry {i} is outside [0, {self.num_layers}]")

  @property
  def aux_layer_ids(self) -> tuple[int, ...]:
    if self.aux_layers is not None:
      return tuple(self.aux_layers)
    L = self.num_layers
    return (min(2, L - 1), L // 2, max(L - 3, 0))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DraftConfig:
  """Shape of an EAGLE-3 draft. Static (hashable) so it can enter jit."""

  hidden_size: int  # D (draft width; equals the target width in every official checkpoint)
  target_hidden_size: int  # Dt, width of each aux state
  intermediate_size: int  # F
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H
  vocab_size: int  # V, target vocabulary (input tokens are embedded with the target's table)
  draft_vocab_size: int  # Vd
  rms_norm_eps: float = 1e-5
  # The official trainer always uses 10000 regardless of the target's theta (reference a.2).
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None  # ModelOpt drafts carry llama3 scaling for long contexts.
  num_aux: int = 3
  norm_before_fc: bool = False
  fc_norm: bool = False
  norm_before_residual: bool = False
  norm_output: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None  # W: a query sees key positions > its own - W (None: full attention)
  num_layers: int = 1  # the first takes [embedding, hidden] (2D wide); the rest are plain decoder layers

  def __post_init__(self):
    if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
      raise ValueError(f"DraftConfig.sliding_window must be None or an int >= 1, got {self.sliding_window!r}")
    if not isinstance(self.num_layers, int) or self.num_layers < 1:
      raise ValueError(f"DraftConfig.num_layers must be an int >= 1, got {self.num_layers!r}")
    if self.norm_before_fc and self.fc_norm:
      raise ValueError("DraftConfig: norm_before_fc and fc_norm are mutually exclusive (as in speculators)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DraftConfig.num_heads={self.num_heads} not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.draft_vocab_size > self.vocab_size:
      raise ValueError(f"DraftConfig.draft_vocab_size={self.draft_vocab_size} exceeds vocab_size={self.vocab_size}")

  @classmethod
  def for_target(cls, target: LlamaConfig, draft_vocab_size: int | None = None, **kw) -> "DraftConfig":
    """The official recipe: a draft as wide as the target, with the target's attention and MLP shapes."""
    return cls(hidden_size=target.hidden_size, target_hidden_size=target.hidden_size,
               intermediate_size=target.intermediate_size, num_heads=target.num_heads,
               num_kv_heads=target.num_kv_heads, head_dim=target.head_dim, vocab_size=target.vocab_size,
               draft_vocab_size=draft_vocab_size or target.vocab_size, rms_norm_eps=target.rms_norm_eps,
               num_aux=len(target.aux_layer_ids), **kw)
