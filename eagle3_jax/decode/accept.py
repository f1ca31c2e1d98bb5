"""Acceptance of a verified draft tree (greedy, or lossless multi-candidate rejection sampling) and the KV commit."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from eagle3_jax.decode import sampling
from eagle3_jax.decode.tree import Tree


@flax.struct.dataclass
class Accepted:
  """Per row: how many draft nodes were accepted, which, and the target's own next token."""

  count: jax.Array  # int32[B] accepted draft nodes, 0..depth
  path: jax.Array  # int32[B,depth] accepted nodes' (P+1)-block indices, root excluded; entries >= count are 0
  bonus: jax.Array  # int32[B] token the target emits after the accepted path (correction or bonus)


def argmax(x: jax.Array) -> jax.Array:
  """First index of the maximum (as jnp.argmax), as two plain reductions: 5x faster on XLA:CPU for [17, 49152]
  (1.2 ms against 5.9 ms measured), where the variadic (value, index) reduce does not vectorise."""
  top = jnp.max(x, axis=-1, keepdims=True)
  return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def _take_node(x_BP: jax.Array, node_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BP, node_B[:, None], axis=1)[:, 0]


def _descend(state, child_B, found_B, step):
  cur, count, path, alive = state
  found = found_B & alive
  path = path.at[:, step].set(jnp.where(found, child_B, 0))
  return jnp.where(found, child_B, cur), count + found.astype(jnp.int32), path, alive & found


def greedy(logits_BPV: jax.Array, tree: Tree, depth: int) -> Accepted:
  """Longest root path whose every token is the target's argmax at its parent; bonus = argmax at its end.

  Siblings carry distinct tokens (top-k of one distribution), so at most one child can match at each step.
  """
  with jax.named_scope("accept_greedy"):
    B = logits_BPV.shape[0]
    best = argmax(logits_BPV)  # [B,P+1]
    state = (jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B, depth), jnp.int32),
             jnp.ones((B,), jnp.bool_))
    for step in range(depth):
      cur = state[0]
      hit = (tree.parents == cur[:, None]) & (tree.tokens == _take_node(best, cur)[:, None])
      state = _descend(state, jnp.argmax(hit, axis=-1).astype(jnp.int32) + 1, hit.any(-1), step)
    cur, count, path, _ = state
    return Accepted(count=count, path=path, bonus=_take_node(best, cur))


def _children(tree: Tree, cur_B: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """The (at most top_k) children of node cur in node order: (block indices [B,k], valid [B,k])."""
  P = tree.tokens.shape[1]
  is_child = tree.parents == cur_B[:, None]
  rank = jnp.where(is_child, -jnp.arange(P), -P - 1)  # top_k of -index = the smallest child indices first
  vals, idx = jax.lax.top_k(rank, top_k)
  return idx.astype(jnp.int32) + 1, vals > -P - 1


def _node_probs(logits_BPV: jax.Array, node_B: jax.Array, cfg: sampling.SamplingConfig) -> jax.Array:
  logits = jnp.take_along_axis(logits_BPV, node_B[:, None, None], axis=1)[:, 0]
  return sampling.target_probs(logits, cfg)


def sample(key: jax.Array, logits_BPV: jax.Array, tree: Tree, depth: int, top_k: int,
           cfg: sampling.SamplingConfig) -> Accepted:
  """Multi-candidate rejection for deterministic top-k proposals (reference d.5), lossless for the target.

  At the current node with target distribution p, siblings x_1..x_m are tried in order: x_j is accepted with
  probability p(x_j) / (1 - sum_{i<j} p(x_i)), i.e. after zeroing and renormalising the rejected ones. If none is
  accepted (or the node is a leaf) the bonus is drawn from p with every tried sibling zeroed. Every token y then has
  total probability p(y), whatever the draft proposed.
  """
  with jax.named_scope("accept_sample"):
    B, _, V = logits_BPV.shape
    keys = jax.random.split(key, depth + 1)
    state = (jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B, depth), jnp.int32),
             jnp.ones((B,), jnp.bool_))
    for step in range(depth):
      cur = state[0]
      p = _node_probs(logits_BPV, cur, cfg)
      child, valid = _children(tree, cur, top_k)
      p_child = jnp.where(valid, jnp.take_along_axis(p, jnp.take_along_axis(tree.tokens, child - 1, axis=1), 1), 0.0)
      remaining = jnp.maximum(1.0 - (jnp.cumsum(p_child, axis=-1) - p_child), 0.0)
      u = jax.random.uniform(keys[step], (B, top_k))
      # Strict '<': a zero-probability child is never accepted, even where `remaining` rounds to zero.
      ok = valid & (u * remaining < p_child)
      first = jnp.argmax(ok, axis=-1)
      state = _descend(state, jnp.take_along_axis(child, first[:, None], axis=1)[:, 0], ok.any(-1), step)
    cur, count, path, _ = state
    # The last node's children were all tried and rejected (or it has none): sample from the residual.
    p = _node_probs(logits_BPV, cur, cfg)
    child, valid = _children(tree, cur, top_k)
    tried = jnp.where(valid, jnp.take_along_axis(tree.tokens, child - 1, axis=1), V)
    p = p.at[jnp.arange(B)[:, None], tried].set(0.0, mode="drop")
    bonus = jax.random.categorical(keys[depth], jnp.log(p), axis=-1).astype(jnp.int32)
    return Accepted(count=count, path=path, bonus=bonus)
