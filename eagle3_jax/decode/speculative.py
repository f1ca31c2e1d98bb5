"""EAGLE-3 speculative decoding under static shapes: prefill, then jitted draft-verify-accept-commit rounds.

Any JAX model can be the target: wrap it in `target.protocol.Target` (`llama_target` for the bundled Llama family).

Invariants between rounds, per row b: cache.lengths = prompt length + counts - 1 (the last emitted token, the next
root, is not in the target cache yet); draft_cache.lengths = cache.lengths - pending_count, where the pending rows
are target positions whose aux states the draft has not consumed yet (draft row p = (fc(aux_p), token p+1)).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eagle3_jax import sharding
from eagle3_jax.config import SpecConfig
from eagle3_jax.decode import accept, sampling, tree, vanilla, xla_cpu
from eagle3_jax.draft import head as draft
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.nn import kv_cache, masks
from eagle3_jax.target.protocol import Target

# Incremented on every trace: tests and the engine use it to prove that nothing retraces per round or per call.
TRACE_COUNT = {"generate": 0, "round": 0}


@flax.struct.dataclass
class SpecState:
  """Everything the round loop carries (see the module docstring for the length invariants)."""

  cache: Any  # target cache
  draft_cache: kv_cache.KVCache
  pending_hidden: jax.Array  # [B,R,D] fc(aux) of target rows the draft has not consumed
  pending_tokens: jax.Array  # int32[B,R] token following each pending row; the last valid one is the next root
  pending_count: jax.Array  # int32[B] 1..R
  tokens: jax.Array  # int32[B, M + R] emitted tokens (stop token kept), pad_id beyond counts
  counts: jax.Array  # int32[B]
  done: jax.Array  # bool[B]
  key: jax.Array  # one PRNG key, or [B] one per row (continuous batching)
  rounds: jax.Array  # int32[B] draft-verify rounds the row took part in
  accepted: jax.Array  # int32[B] sum over those rounds of accepted nodes + 1 (the bonus): tau = accepted / rounds
  steps: jax.Array  # int32[] loop iterations


def _state_axes(state: SpecState, target: Target) -> SpecState:
  row = lambda x: ("batch",) + (None,) * (x.ndim - 1)
  axes = jax.tree.map(row, state)
  axes = axes.replace(draft_cache=kv_cache.axes(len(state.draft_cache.k)), key=(), steps=())
  if target.cache_axes is not None:
    axes = axes.replace(cache=target.cache_axes)
  return axes


def _constrain(state: SpecState, target: Target, mesh: Mesh | None) -> SpecState:
  if mesh is None:
    return state
  is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)
  return jax.tree.map(lambda ax, x: sharding.constrain(x, mesh, ax), _state_axes(state, target), state,
                      is_leaf=is_axes)


def _emit(state: SpecState, new_BR: jax.Array, n_new_B: jax.Array, spec: SpecConfig) -> SpecState:
  """Appends up to n_new tokens per active row, cut after a stop id or at max_new_tokens (which end the row)."""
  active = ~state.done
  R = new_BR.shape[1]
  j = jnp.arange(R)[None, :]
  stop = (jnp.isin(new_BR, jnp.asarray(spec.stop_ids, jnp.int32)) if spec.stop_ids
          else jnp.zeros(new_BR.shape, jnp.bool_)) & (j < n_new_B[:, None])
  upto_stop = jnp.where(stop.any(-1), jnp.argmax(stop, axis=-1) + 1, R)
  n = jnp.where(active, jnp.minimum(jnp.minimum(n_new_B, upto_stop), spec.max_new_tokens - state.counts), 0)
  block = jnp.where(j < n[:, None], new_BR, spec.pad_id)
  tokens = jax.vmap(lambda buf, blk, c: jax.lax.dynamic_update_slice(buf, blk, (c,)))(state.tokens, block,
                                                                                      state.counts)
  counts = state.counts + n
  stopped = (stop & (j < n[:, None])).any(-1)
  done = state.done | (active & (stopped | (counts >= spec.max_new_tokens)))
  return state.replace(tokens=tokens, counts=counts, done=done)


def prefill(target: Target, target_params: Any, draft_params: Any, embed_VD: jax.Array, tokens_BT: jax.Array,
            lengths_B: jax.Array, key: jax.Array, *, dcfg: draft.DraftConfig, spec: SpecConfig,
            mesh: Mesh | None = None, cache_lens: tuple[int, int] | None = None) -> SpecState:
  """Target over right-padded prompts, first token sampled; the draft caches K/V of rows 0..n-2.

  cache_lens: (target, draft) cache slots, default spec.cache_lengths(T) (continuous batching passes its pool's).
  """
  B, T = tokens_BT.shape
  S_t, S_d = cache_lens or spec.cache_lengths(T)
  lengths_B = lengths_B.astype(jnp.int32)
  last = lengths_B - 1
  with jax.named_scope("prefill"):
    cache = target.init_cache(B, S_t, embed_VD.dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # Padded queries write junk K/V past each prompt; no later query sees a slot before it is rewritten.
    mask = masks.cache_causal_mask(jnp.zeros((B,), jnp.int32), T, S_t)
    take_last = lambda x: jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    logits, aux, cache = target.last_logits(target_params, tokens_BT, positions, cache, mask, last)
    key, root = sampling.split_sample(key, logits, spec.sampling)
    # Draft row p = (fc(aux_p), token p+1): rows p < n-1 only need their K/V (no attention, no MLP).
    hidden_d = draft.fuse(draft_params, aux, cfg=dcfg)
    next_tokens = jnp.concatenate([tokens_BT[:, 1:], jnp.full((B, 1), spec.pad_id, tokens_BT.dtype)], axis=1)
    emb_next = jnp.take(embed_VD, next_tokens, axis=0)
    dcache = draft.init_cache(dcfg, B, S_d, hidden_d.dtype)
    zeros = jnp.zeros((B,), jnp.int32)
    if dcfg.num_layers == 1:
      _, k, v = draft.qkv(draft_params, emb_next, hidden_d, positions, cfg=dcfg)
      dcache = dcache.replace(k=(kv_cache.write_rows(dcache.k[0], k, zeros),),
                              v=(kv_cache.write_rows(dcache.v[0], v, zeros),))
    else:  # layers 1.. need layer 0's outputs for their K/V: a full causal pass over the prompt rows
      _, dcache = draft.forward(draft_params, emb_next, hidden_d, positions, dcache,
                                masks.cache_causal_mask(zeros, T, S_d), cfg=dcfg)
    dcache = dcache.replace(lengths=last)
  R = spec.rows
  state = SpecState(
      cache=cache.replace(lengths=lengths_B), draft_cache=dcache,
      pending_hidden=jnp.zeros((B, R, hidden_d.shape[-1]), hidden_d.dtype).at[:, 0].set(take_last(hidden_d)),
      pending_tokens=jnp.full((B, R), spec.pad_id, jnp.int32).at[:, 0].set(root),
      pending_count=jnp.ones((B,), jnp.int32),
      tokens=jnp.full((B, spec.max_new_tokens + R), spec.pad_id, jnp.int32), counts=zeros,
      done=jnp.zeros((B,), jnp.bool_), key=key, rounds=zeros, accepted=zeros, steps=jnp.zeros((), jnp.int32))
  state = _emit(state, root[:, None], jnp.ones((B,), jnp.int32), spec)
  return _constrain(state, target, mesh)


def spec_round(target: Target, target_params: Any, draft_params: Any, embed_VD: jax.Array, vocab: DraftVocab,
               state: SpecState, *, dcfg: draft.DraftConfig, spec: SpecConfig,
               mesh: Mesh | None = None) -> SpecState:
  """One draft-verify round for every row: context pass, tree expansion, verify, accept, commit, emit."""
  TRACE_COUNT["round"] += 1
  tcfg, R = spec.tree, spec.rows
  active = ~state.done
  take_row = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]
  with jax.named_scope("draft_context"):
    dcache = state.draft_cache
    base = dcache.lengths
    positions = base[:, None] + jnp.arange(R, dtype=jnp.int32)[None, :]
    # Static R rows; rows past pending_count are junk written past the committed prefix, invisible to later queries.
    out, dcache = draft.forward(draft_params, jnp.take(embed_VD, state.pending_tokens, axis=0), state.pending_hidden,
                                positions, dcache, masks.cache_causal_mask(base, R, dcache.max_len), cfg=dcfg)
    last_hidden = jnp.take_along_axis(out, (state.pending_count - 1)[:, None, None], axis=1)[:, 0]
    dcache = dcache.replace(lengths=base + state.pending_count)
  draft_tree, dcache = tree.expand(draft_params, embed_VD, vocab, last_hidden, dcache, dcfg=dcfg, cfg=tcfg)

  with jax.named_scope("verify"):
    L = state.cache.lengths
    root = take_row(state.pending_tokens, state.pending_count - 1)
    block_tokens = jnp.concatenate([root[:, None], draft_tree.tokens], axis=1)  # [B,P+1]
    positions = L[:, None] + jnp.concatenate([jnp.zeros_like(root)[:, None], draft_tree.depths], axis=1)
    mask = masks.block_mask(L, draft_tree.mask, target.cache_slots(state.cache))
    logits, aux, cache = target.forward(target_params, block_tokens, positions, state.cache, mask)

  if state.key.ndim == 0 or spec.sampling.greedy:
    key, sub = jax.random.split(state.key) if state.key.ndim == 0 else (state.key, None)
    acc = (accept.greedy(logits, draft_tree, tcfg.max_accept) if spec.sampling.greedy else
           accept.sample(sub, logits, draft_tree, tcfg.max_accept, tcfg.top_k, spec.sampling))
  else:  # one key per row (continuous batching): each row's acceptance draws only from its own key
    split = jax.vmap(jax.random.split)(state.key)
    key = split[:, 0]
    one = lambda k, lg, tr: jax.tree.map(lambda x: x[0], accept.sample(  # noqa: E731
        k, lg[None], jax.tree.map(lambda x: x[None], tr), tcfg.max_accept, tcfg.top_k, spec.sampling))
    acc = jax.vmap(one)(split[:, 1], logits, draft_tree)
  if not tcfg.is_chain:  # a chain's accepted nodes already sit at contiguous slots
    cache = kv_cache.commit(cache, L, acc.path, acc.count, tcfg.total_tokens, target.slot_axis)

  j = jnp.arange(R)[None, :]
  rows = jnp.concatenate([jnp.zeros_like(root)[:, None], acc.path], axis=1)  # root + accepted, padded with root
  path_tokens = jnp.concatenate([jnp.take_along_axis(block_tokens, acc.path, axis=1),
                                 jnp.full_like(root, spec.pad_id)[:, None]], axis=1)
  emitted = jnp.where(j == acc.count[:, None], acc.bonus[:, None], path_tokens)
  emitted = jnp.where(j <= acc.count[:, None], emitted, spec.pad_id)
  new = _emit(state, emitted, acc.count + 1, spec)
  # Only rows that go on advance: a finished row's lengths stay where its later (ignored) writes still fit.
  go_on = ~new.done
  with jax.named_scope("feed_back"):
    new_hidden = draft.fuse(draft_params, jnp.take_along_axis(aux, rows[:, :, None], axis=1), cfg=dcfg)
  pick = lambda a, b: jnp.where(go_on.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  new = new.replace(
      cache=cache.replace(lengths=jnp.where(go_on, L + acc.count + 1, L)),
      draft_cache=dcache.replace(lengths=jnp.where(go_on, dcache.lengths, base)),
      pending_hidden=pick(new_hidden.astype(state.pending_hidden.dtype), state.pending_hidden),
      pending_tokens=pick(emitted, state.pending_tokens),
      pending_count=jnp.where(go_on, acc.count + 1, state.pending_count),
      key=key, rounds=state.rounds + active.astype(jnp.int32),
      accepted=state.accepted + jnp.where(active, acc.count + 1, 0), steps=state.steps + 1)
  return _constrain(new, target, mesh)


def generate_core(target: Target, target_params: Any, draft_params: Any, vocab: DraftVocab,
                  tokens_BT: jax.Array, lengths_B: jax.Array, key: jax.Array, embed_VD: jax.Array | None = None, *,
                  dcfg: draft.DraftConfig, spec: SpecConfig, mesh: Mesh | None = None) -> SpecState:
  """Prefill + lax.while_loop over rounds until every row is done; no host round trip per round. Unvalidated."""
  TRACE_COUNT["generate"] += 1
  embed_VD = target.embed(target_params) if embed_VD is None else embed_VD
  target_params = xla_cpu.decode_params(target, target_params,
                                         rows=tokens_BT.shape[0] * (spec.tree.total_tokens + 1))
  kw = dict(dcfg=dcfg, spec=spec, mesh=mesh)
  state = prefill(target, target_params, draft_params, embed_VD, tokens_BT, lengths_B, key, **kw)
  body = functools.partial(spec_round, target, target_params, draft_params, embed_VD, vocab, **kw)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


_STATIC = ("target", "dcfg", "spec", "mesh")
generate_jit = jax.jit(generate_core, static_argnames=_STATIC)
prefill_jit = jax.jit(prefill, static_argnames=_STATIC)
round_jit = jax.jit(spec_round, static_argnames=_STATIC, donate_argnames=("state",))


def validate(target: Target, target_params: Any, draft_params: Any, vocab: DraftVocab, tokens_BT: Any,
             lengths_B: Any, embed_VD: Any = None, *, dcfg: draft.DraftConfig, spec: SpecConfig) -> None:
  """Host-side checks with clear errors (inside jit these would silently read or write the wrong slots)."""
  tokens_BT, lengths_B = vanilla.validate_prompts(tokens_BT, lengths_B, target.vocab_size)
  T = tokens_BT.shape[1]
  P, M = spec.tree.total_tokens, spec.max_new_tokens
  S_t, _ = spec.cache_lengths(T)
  if T + M + P > S_t:
    raise ValueError(f"prompt bucket T={T} + max_new_tokens={M} + tree nodes {P} = {T + M + P} exceeds the target "
                     f"KV cache length {S_t}: the prompt is too long for the cache")
  if int(lengths_B.max()) + M + spec.tree.depth > target.max_positions:
    raise ValueError(f"prompt of {int(lengths_B.max())} tokens + max_new_tokens={M} + tree depth "
                     f"{spec.tree.depth} exceeds the target's {target.max_positions} positions")
  if dcfg.vocab_size != target.vocab_size:
    raise ValueError(f"draft vocab_size={dcfg.vocab_size} does not match the target's vocab_size={target.vocab_size}")
  if dcfg.num_aux * dcfg.target_hidden_size != target.aux_size:
    raise ValueError(f"draft expects aux width num_aux*target_hidden_size={dcfg.num_aux * dcfg.target_hidden_size} "
                     f"but the target's aux states are {target.aux_size} wide")
  want = {"fc": (dcfg.num_aux * dcfg.target_hidden_size, dcfg.hidden_size),
          "lm_head": (dcfg.hidden_size, dcfg.draft_vocab_size)}
  for name, shape in want.items():
    if tuple(draft_params[name].shape) != shape:
      raise ValueError(f"draft param {name!r} has shape {tuple(draft_params[name].shape)}, the draft config "
                       f"needs {shape}")
  embed = target.embed(target_params) if embed_VD is None else embed_VD
  if tuple(embed.shape) != (target.vocab_size, dcfg.hidden_size):
    raise ValueError(f"embedding table {tuple(embed.shape)} does not match (vocab_size, draft hidden_size) = "
                     f"{(target.vocab_size, dcfg.hidden_size)}: draft width and target width differ")
  if tuple(vocab.d2t.shape) != (dcfg.draft_vocab_size,):
    raise ValueError(f"vocab.d2t has shape {tuple(vocab.d2t.shape)}, expected ({dcfg.draft_vocab_size},)")
  if int(np.asarray(vocab.target_ids()).max()) >= target.vocab_size:
    raise ValueError(f"vocab.d2t maps draft ids outside the target vocabulary [0, {target.vocab_size})")
  if dcfg.sliding_window is not None and dcfg.sliding_window <= spec.tree.depth + spec.rows:
    raise ValueError(f"draft sliding_window={dcfg.sliding_window} must exceed tree depth + fed-back rows "
                     f"({spec.tree.depth + spec.rows}): the draft's uncommitted rows must stay inside its window")
  if spec.tree.top_k > dcfg.draft_vocab_size:
    raise ValueError(f"TreeConfig.top_k={spec.tree.top_k} exceeds draft_vocab_size={dcfg.draft_vocab_size}")


def generate(target: Target, target_params: Any, draft_params: Any, vocab: DraftVocab, tokens_BT: Any,
             lengths_B: Any, key: jax.Array, embed_VD: jax.Array | None = None, *, dcfg: draft.DraftConfig,
             spec: SpecConfig, mesh: Mesh | None = None) -> SpecState:
  """Library entry point: validates, then runs the jitted prefill + round loop. See `outputs` for the results."""
  validate(target, target_params, draft_params, vocab, tokens_BT, lengths_B, embed_VD, dcfg=dcfg, spec=spec)
  return generate_jit(target, target_params, draft_params, vocab, jnp.asarray(tokens_BT, jnp.int32),
                      jnp.asarray(lengths_B, jnp.int32), key, embed_VD, dcfg=dcfg, spec=spec, mesh=mesh)


def outputs(state: SpecState, spec: SpecConfig) -> dict[str, np.ndarray]:
  """Host copies: tokens [B, max_new_tokens] (pad beyond counts), counts, rounds, accepted and tau per row."""
  tokens, counts, rounds, accepted = jax.device_get((state.tokens, state.counts, state.rounds, state.accepted))
  return {"tokens": tokens[:, :spec.max_new_tokens], "counts": counts, "rounds": rounds, "accepted": accepted,
          "tau": accepted / np.maximum(rounds, 1)}
