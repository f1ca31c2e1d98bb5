"""The tree that fits the hardware (`--tree auto`): the draft's measured acceptance (acceptance.py), this
machine's measured round costs (costs.py), and the predicted tokens/s of plain decoding and of every candidate
shape for a request set (choice.py). `python -m eagle3_jax.decode.autotree` writes a draft's acceptance file and ranks
the shapes.
"""

from eagle3_jax.decode.autotree.acceptance import (
    ACCEPTANCE_FILE,
    MAX_DEPTH,
    MAX_TOP_K,
    Acceptance,
    acceptance,
    examples_from_outputs,
    examples_from_rows,
    static_tree,
    walk_tau,
)
from eagle3_jax.decode.autotree.choice import (
    MARGIN,
    SHALLOW_TIE,
    Prediction,
    candidates,
    choose,
    continuous_seconds,
    engine_batches,
    predict,
    prefer_shallow,
    shape_str,
)
from eagle3_jax.decode.autotree.costs import CACHE_LENS, PREFILL_LENS, VERIFY_POINTS, Costs, cached_costs, calibrate
from eagle3_jax.decode.tree import TreeConfig

__all__ = ["ACCEPTANCE_FILE", "CACHE_LENS", "MARGIN", "MAX_DEPTH", "MAX_TOP_K", "PREFILL_LENS", "SHALLOW_TIE",
           "VERIFY_POINTS", "Acceptance",
           "Costs", "Prediction", "TreeConfig", "acceptance", "cached_costs", "calibrate", "candidates", "choose",
           "continuous_seconds", "engine_batches", "examples_from_outputs", "examples_from_rows", "predict",
           "prefer_shallow", "shape_str", "static_tree", "walk_tau"]
