"""How decode executables are compiled on XLA:CPU: few-row products without YNNPACK, the head read as [D, V].

A decode step or a verify pass multiplies a few rows (B x T tokens: T = 2..5 for the chains and small trees that pay
on a CPU) by every weight matrix, so it should cost what reading the weights once costs. XLA:CPU hands such
products to YNNPACK by default, whose GEMM costs up to twice the one-row product over the same weights (SmolLM2 on 2
cores: a verify pass of T = 4 tokens 1.9x a decode step). With YNNPACK fusions off they go to XLA's own kernels,
which stream [D, F] weights for 2..5 rows at about the one-row cost (T = 4: 1.2x a step; at batch 4 every T,
decoding included, is faster too) — but only when the contraction runs over the weights' major axis: the tied
head ([V, D], contracted over D) becomes ten times slower there. BENCHMARKS.md "Few-row products on XLA:CPU".

So on a CPU backend the executables that decode more than one row a step (vanilla loops at batch > 1, speculative
generation, slot loops, the autotree calibration's timed loops) compile with `compiler_options()`; all of them read
their parameters through
`decode_params`, which gives the target's head a [D, V] copy made once per call, outside the decode loop (for 8-16
rows a step the Llama target lays it out in 768-column blocks instead: `llama.decode_layout`).
Prefill-only executables (the slot batchers' admissions) keep XLA's defaults: a 200-token prefill is ~15% faster
with YNNPACK. On other backends both are no-ops. `EAGLE3_JAX_DECODE_DOTS=ynn` keeps XLA's defaults everywhere
(for side-by-side measurements).
"""

from __future__ import annotations

import os
from typing import Any

import jax

ENV = "EAGLE3_JAX_DECODE_DOTS"
_FEW_ROW_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions: dots go to XLA's kernels


def active() -> bool:
  """True when decode executables use the few-row settings: a CPU backend, not switched off by $EAGLE3_JAX_DECODE_DOTS.
  Read at trace and at compile time, so one process traces and compiles consistently."""
  mode = os.environ.get(ENV, "xla")
  if mode not in ("xla", "ynn"):
    raise ValueError(f"${ENV} must be 'xla' (few-row products in XLA's kernels on CPU, the default) or 'ynn' "
                     f"(XLA:CPU's defaults), got {mode!r}")
  return mode == "xla" and jax.default_backend() == "cpu"


def compiler_options(rows: int = 2) -> dict[str, str] | None:
  """compiler_options for `Lowered.compile` of a decode executable whose loop multiplies `rows` rows (batch x tokens
  a step) by each weight matrix; None: the backend's defaults. One row (plain decoding at batch 1) keeps the
  defaults: a one-row product streams its weights either way, and the rest of the step measured 6-20% faster with
  YNNPACK's fusions (BENCHMARKS.md "Few-row products on XLA:CPU")."""
  return dict(_FEW_ROW_OPTIONS) if active() and rows > 1 else None


class KeptLayouts:
  """The target's params in their decode layout, made once per `rows` and kept (a generator's executables then find
  them laid out and make no copy): a generator that runs many calls pays the layout once, not once per call."""

  def __init__(self, target: Any, params: Any):
    self.target, self.params, self._by_rows = target, params, {}

  def __call__(self, rows: int) -> Any:
    if rows not in self._by_rows:
      self._by_rows[rows] = decode_params(self.target, self.params, rows=rows)
    return self._by_rows[rows]


def decode_params(target: Any, params: Any, *, rows: int) -> Any:
  """The target's parameters in its decode layout for `rows` rows a step (`Target.decode_layout`), when active;
  traced inside the executable, once, before its loop, or made once eagerly by a caller that keeps them (the
  generators and slot batchers, whose executables then find them laid out: a layout returns laid-out params as they
  are). Eagerly, only the layout's new arrays are new; the rest are the caller's buffers."""
  layout = getattr(target, "decode_layout", None)
  return layout(params, rows=rows) if layout is not None and active() else params
