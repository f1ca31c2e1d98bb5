"""Read and write EAGLE-3 drafts in the official EAGLE / SGLang / ModelOpt layout and the speculators (vLLM) layout."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Any

import numpy as np

from eagle3_jax.draft.head import DraftConfig, param_specs
from eagle3_jax.draft.vocab import DraftVocab
from eagle3_jax.interop import files, formats

READ_LAYOUTS = ("eagle", "sglang", "speculators", "modelopt")
WRITE_LAYOUTS = ("eagle", "speculators")

# (path in our param tree, PyTorch key without the layer prefix, leading input axes of our kernel or 0 for a vector).
# PyTorch Linear weights are [out, in]; ours are [in, out] with heads split out, so q is [2D,N,H] and o is [N,H,D].
_LAYER_TABLE = (
    (("midlayer", "input_layernorm"), "input_layernorm.weight", 0),
    (("midlayer", "hidden_norm"), "hidden_norm.weight", 0),
    (("midlayer", "self_attn", "q_proj"), "self_attn.q_proj.weight", 1),
    (("midlayer", "self_attn", "k_proj"), "self_attn.k_proj.weight", 1),
    (("midlayer", "self_attn", "v_proj"), "self_attn.v_proj.weight", 1),
    (("midlayer", "self_attn", "o_proj"), "self_attn.o_proj.weight", 2),
    (("midlayer", "post_attention_layernorm"), "post_attention_layernorm.weight", 0),
    (("midlayer", "mlp", "gate_proj"), "mlp.gate_proj.weight", 1),
    (("midlayer", "mlp", "up_proj"), "mlp.up_proj.weight", 1),
    (("midlayer", "mlp", "down_proj"), "mlp.down_proj.weight", 1),
)
_TOP_TABLE = ((("fc",), "fc.weight", 1), (("norm",), "norm.weight", 0), (("lm_head",), "lm_head.weight", 1))
_PREFIXES = ("midlayer.", "layers.0.")  # official / SGLang / ModelOpt vs speculators; vLLM accepts both
EMBED_KEY = "embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class DraftCheckpoint:
  """A draft head with everything needed to serve it, independent of the file layout it came from.

  params are host numpy arrays in our layout (draft.param_specs); aux_layer_ids are ALWAYS in input numbering
  (HF hidden_states index = the layer whose input is tapped), ascending, e.g. (2, 15, 27) for a 30-layer target.
  """

  cfg: DraftConfig
  params: dict
  vocab: DraftVocab
  aux_layer_ids: tuple[int, ...]
  embed: np.ndarray | None = None  # [V, D] embed_tokens when the file carries one
  source_layout: str = "jax"  # "eagle" | "sglang" | "speculators" | "modelopt" | "jax" (built in memory)
  extra: dict = dataclasses.field(default_factory=dict)  # verifier, max_position_embeddings, token ids, file_dtype


# ----- tensors ------------------------------------------------------------------------------------------------


def _torch_shape(shape: tuple[int, ...], n_in: int) -> tuple[int, ...]:
  return tuple(shape) if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _from_torch(w: np.ndarray, shape: tuple[int, ...], n_in: int) -> np.ndarray:
  return w if n_in == 0 else np.ascontiguousarray(w.T).reshape(shape)


def _to_torch(x: np.ndarray, n_in: int) -> np.ndarray:
  return x if n_in == 0 else np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)


def _float(key: str, w: np.ndarray, dtype: np.dtype) -> np.ndarray:
  if w.dtype not in files.FLOAT_DTYPES:
    raise ValueError(f"key {key!r} has dtype {w.dtype}, expected a float tensor")
  return w.astype(dtype)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out: dict[str, Any] = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}."))
  return out


def _table(cfg: DraftConfig, prefix: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], int]]:
  """PyTorch key -> (our param path, our shape, input axes) for this config (variant norms included)."""
  specs = _flatten(param_specs(cfg))
  rows = [(prefix + key, path, n_in) for path, key, n_in in _LAYER_TABLE]
  rows += [(key, path, n_in) for path, key, n_in in _TOP_TABLE]
  if cfg.norm_before_fc:
    rows.append(("input_norm.weight", ("input_norm",), 0))
  if cfg.fc_norm:
    rows += [(f"fc_norm.{i}.weight", ("fc_norm", str(i)), 0) for i in range(cfg.num_aux)]
  if cfg.qk_norm:
    rows += [(f"{prefix}self_attn.{n}.weight", ("midlayer", "self_attn", n), 0) for n in ("q_norm", "k_norm")]
  for i in range(1, cfg.num_layers):  # plain decoder layers: speculators' layers.{i}, no hidden_norm
    layer = [(f"layers.{i}.{key}", ("layers", str(i)) + path[1:], n_in) for path, key, n_in in _LAYER_TABLE
             if key != "hidden_norm.weight"]
    if cfg.qk_norm:
      layer += [(f"layers.{i}.self_attn.{n}.weight", ("layers", str(i), "self_attn", n), 0)
                for n in ("q_norm", "k_norm")]
    rows += layer
  return {key: (path, specs[".".join(path)].shape, n_in) for key, path, n_in in rows}


def _layer_prefix(names) -> str:
  found = [p for p in _PREFIXES if any(n.startswith(p) for n in names)]
  if len(found) > 1:
    raise ValueError(f"checkpoint mixes {found[0]!r} and {found[1]!r} keys")
  return found[0] if found else _PREFIXES[0]


def _unknown_key(key: str) -> ValueError:
  if key.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
    return ValueError(f"key {key!r} is a Qwen3-style q/k norm, but config.json describes a Llama draft layer "
                      "(model_type is not qwen3)")
  if key.startswith("fc_norm."):
    return ValueError(f"key {key!r} is an EAGLE 3.1 per-aux-state norm, but config.json does not set fc_norm")
  if key.startswith("input_norm."):
    return ValueError(f"key {key!r} is a norm of the concatenated aux states, but config.json does not set "
                      "norm_before_fc")
  if key == "fc.bias":
    return formats.refuse(f"key {key!r}", formats.REFUSED_FLAGS["bias"])
  layer = re.match(r"(?:layers|midlayers|additional_layers)\.(\d+)\.", key)
  if layer and (int(layer.group(1)) > 0 or key.startswith("additional_layers.")):
    return ValueError(f"key {key!r} belongs to a draft layer beyond those config.json's num_hidden_layers states")
  return ValueError(f"unknown key {key!r} in the checkpoint (not part of a plain EAGLE-3 draft)")


def _vocab(tensors: dict[str, np.ndarray], V: int, Vd: int) -> DraftVocab:
  """DraftVocab from d2t and/or t2d (ModelOpt writes only d2t), checking they describe one ascending id set."""
  d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
  if d2t is None and t2d is None:
    if Vd != V:
      raise ValueError(f"missing key 'd2t': draft_vocab_size={Vd} differs from vocab_size={V}")
    return DraftVocab.identity(V)
  if t2d is not None:
    if t2d.shape != (V,):
      raise ValueError(f"key 't2d' has shape {t2d.shape}, expected ({V},)")
    if t2d.dtype != bool and not (t2d.dtype.kind in "iu" and np.isin(t2d, (0, 1)).all()):
      raise ValueError(f"key 't2d' has dtype {t2d.dtype}, expected bool")
  if d2t is not None:
    if d2t.shape != (Vd,):
      raise ValueError(f"key 'd2t' has shape {d2t.shape}, expected ({Vd},)")
    if d2t.dtype.kind not in "iu":
      raise ValueError(f"key 'd2t' has dtype {d2t.dtype}, expected an integer tensor")
    ids, name = np.arange(Vd, dtype=np.int64) + d2t.astype(np.int64), "d2t"
  else:
    ids, name = np.flatnonzero(t2d), "t2d"
    if ids.shape != (Vd,):
      raise ValueError(f"key 't2d' marks {ids.size} target ids, expected draft_vocab_size={Vd}")
  if np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= V:
    raise ValueError(f"key {name!r} maps draft ids to target ids that are not strictly ascending in [0, {V})")
  if t2d is not None and d2t is not None:
    expected = np.zeros((V,), bool)
    expected[ids] = True
    if not np.array_equal(t2d.astype(bool), expected):
      raise ValueError("key 't2d' disagrees with 'd2t' (they must mark the same target ids)")
  return DraftVocab.from_ids(ids, V)


# ----- read ---------------------------------------------------------------------------------------------------


def read_draft(path, *, num_target_layers: int | None = None, dtype=np.float32,
               norm_output_means: str | None = None) -> DraftCheckpoint:
  """Reads a draft directory in any supported layout (see READ_LAYOUTS); float weights come back in `dtype`.

  num_target_layers is needed only when config.json states no aux layer ids (official EAGLE files), and then
  also bounds-checks the ids. Unknown, missing or wrong-shaped keys and unsupported variants raise ValueError.
  norm_output_means says how to read `norm_output` in an official / SGLang-layout file that does not say itself
  (formats.NORM_OUTPUT_MEANINGS: "eagle3.1" for SpecForge after its PR #879, "final-norm" for SpecForge 0.2.0);
  without it such a file is refused, since the two readings are different networks.
  """
  path, dtype = pathlib.Path(path), files.as_float_dtype(dtype)
  config = files.load_json(path / "config.json")
  own = formats.own_block(config)
  speculators = any(k in config for k in ("speculators_model_type", "speculators_config", "transformer_layer_config"))
  if speculators:
    shape, aux, extra = formats.parse_speculators(config, num_target_layers)
  else:
    shape, aux, extra = formats.parse_eagle(config, num_target_layers, norm_output_means)
  tensors, weight_file = files.load_tensors(path)
  if speculators:
    layout = "speculators"
  elif "d2t" in tensors and "t2d" not in tensors:
    layout = "modelopt"
  else:
    layout = "sglang" if config.get("eagle_config") else "eagle"
  D = shape["hidden_size"]
  Dt = config.get("target_hidden_size") or D
  cfg = DraftConfig(**shape, target_hidden_size=Dt, draft_vocab_size=config.get("draft_vocab_size") or
                    shape["vocab_size"], num_aux=len(aux))

  table = _table(cfg, _layer_prefix(tensors))
  for key in tensors:
    if key not in table and key not in ("d2t", "t2d", EMBED_KEY):
      raise _unknown_key(key)
  params: dict = {}
  for key, (p, our_shape, n_in) in table.items():
    if key not in tensors:
      raise ValueError(f"missing key {key!r} in {path / weight_file}")
    w = tensors[key]
    if tuple(w.shape) != _torch_shape(our_shape, n_in):
      raise ValueError(f"key {key!r} has shape {tuple(w.shape)} but config.json implies "
                       f"{_torch_shape(our_shape, n_in)}")
    node = params
    for name in p[:-1]:
      node = node.setdefault(name, {})
    node[p[-1]] = _from_torch(_float(key, w, dtype), our_shape, n_in)
  embed = None
  if EMBED_KEY in tensors:
    if tensors[EMBED_KEY].shape != (cfg.vocab_size, D):
      raise ValueError(f"key {EMBED_KEY!r} has shape {tensors[EMBED_KEY].shape}, expected ({cfg.vocab_size}, {D})")
    embed = _float(EMBED_KEY, tensors[EMBED_KEY], dtype)
  elif Dt != D:
    raise ValueError(f"config.json sets target_hidden_size={Dt} != hidden_size={D} but the checkpoint has no "
                     f"{EMBED_KEY!r}: the target's {Dt}-wide embedding cannot feed this draft")

  if not speculators:
    extra.update({k: config.get(k) for k in ("max_position_embeddings", "bos_token_id", "eos_token_id",
                                             "pad_token_id")})
  for key in formats.PORTABLE_EXTRA:
    if extra.get(key) is None and own.get(key) is not None:
      extra[key] = own[key]
  extra["file_dtype"] = str(tensors["fc.weight"].dtype)
  extra = {k: v for k, v in extra.items() if v is not None and v != []}
  return DraftCheckpoint(cfg=cfg, params=params, vocab=_vocab(tensors, cfg.vocab_size, cfg.draft_vocab_size),
                         aux_layer_ids=aux, embed=embed, source_layout=own.get("layout", layout), extra=extra)


# ----- write --------------------------------------------------------------------------------------------------


def _host(x: Any) -> np.ndarray:
  return np.asarray(x)  # also pulls (fully addressable) jax.Arrays to the host


def _validate(ckpt: DraftCheckpoint, layout: str, include_embed: bool, embed: Any) -> None:
  """Everything a reader will check, checked before a single byte is written."""
  if layout not in WRITE_LAYOUTS:
    raise ValueError(f"layout {layout!r} is not one of {WRITE_LAYOUTS}")
  cfg = ckpt.cfg
  specs = {k: s.shape for k, s in _flatten(param_specs(cfg)).items()}
  params = _flatten(ckpt.params)
  for name in params:
    if name not in specs:
      raise ValueError(f"params has an unknown entry {name!r}")
  for name, shape in specs.items():
    if name not in params:
      raise ValueError(f"params is missing {name!r}")
    if tuple(_host(params[name]).shape) != tuple(shape):
      raise ValueError(f"params[{name!r}] has shape {tuple(_host(params[name]).shape)}, expected {tuple(shape)}")
  _vocab({"d2t": _host(ckpt.vocab.d2t), "t2d": _host(ckpt.vocab.t2d)}, cfg.vocab_size, cfg.draft_vocab_size)
  if len(ckpt.aux_layer_ids) != cfg.num_aux:
    raise ValueError(f"aux_layer_ids={ckpt.aux_layer_ids} has {len(ckpt.aux_layer_ids)} entries but "
                     f"cfg.num_aux={cfg.num_aux}")
  aux = [int(i) for i in ckpt.aux_layer_ids]
  if formats.check_aux_ids(aux, "aux_layer_ids", None) != tuple(aux):
    raise ValueError(f"aux_layer_ids={tuple(aux)} must be ascending: engines concatenate the taps in layer order")
  if layout == "eagle":
    formats.aux_ids_to_output_numbering(ckpt.aux_layer_ids)
  if embed is not None and tuple(np.shape(embed)) != (cfg.vocab_size, cfg.hidden_size):
    raise ValueError(f"embed has shape {tuple(np.shape(embed))}, expected ({cfg.vocab_size}, {cfg.hidden_size})")
  if cfg.target_hidden_size != cfg.hidden_size and (ckpt.embed is None or not include_embed):
    raise ValueError(f"a draft with hidden_size={cfg.hidden_size} != target_hidden_size={cfg.target_hidden_size} "
                     f"must carry its own {EMBED_KEY!r}; ckpt.embed is missing or include_embed=False")
  if layout == "speculators" and include_embed and embed is None:
    raise ValueError(f"the speculators layout needs {EMBED_KEY!r}: speculators' from_pretrained leaves a missing "
                     "embedding at zero and the draft then proposes garbage. Pass target_embed= (the target's "
                     "[V, D] input embedding; `convert --target`), or include_embed=False for a server that shares "
                     "the target's embedding (vLLM)")


def write_draft(path, ckpt: DraftCheckpoint, *, layout: str = "eagle", verifier: str | None = None,
                dtype=np.float32, verifier_architectures: list[str] | None = None,
                speculative_tokens: int | None = None, max_position_embeddings: int | None = None,
                include_embed: bool = True, target_embed: Any = None, overwrite: bool = False) -> None:
  """Writes config.json + model.safetensors in `layout` ("eagle" = official / SGLang, or "speculators").

  Float weights are written as `dtype` (fp32 default; bf16 / fp16 to halve the size), d2t as int64, t2d as bool
  (neither for a full-vocabulary draft in the speculators layout, which reports them as unexpected keys).
  embed_tokens is the draft's own embedding, else `target_embed` (the target's [V, D] table); the speculators
  layout needs one of them unless include_embed=False. Keyword arguments override ckpt.extra (verifier is required
  for speculators). The directory appears atomically; an existing one is replaced only with overwrite=True.
  """
  dtype = files.as_float_dtype(dtype)
  embed = ckpt.embed if ckpt.embed is not None else target_embed
  _validate(ckpt, layout, include_embed, embed)
  extra = {k: ckpt.extra[k] for k in formats.PORTABLE_EXTRA if ckpt.extra.get(k) is not None}
  for key, value in (("verifier", verifier), ("verifier_architectures", verifier_architectures),
                     ("speculative_tokens", speculative_tokens), ("max_position_embeddings", max_position_embeddings)):
    if value is not None:
      extra[key] = list(value) if key == "verifier_architectures" else value
  # Defaults made explicit, so the file records them and a re-export writes identical bytes.
  extra.setdefault("max_position_embeddings", formats.DEFAULT_MAX_POSITION_EMBEDDINGS)
  extra.setdefault("speculative_tokens", formats.DEFAULT_SPECULATIVE_TOKENS)
  build = formats.eagle_config if layout == "eagle" else formats.speculators_config
  config = build(ckpt.cfg, tuple(int(i) for i in ckpt.aux_layer_ids), extra, str(dtype))

  prefix = "midlayer." if layout == "eagle" else "layers.0."
  params = _flatten(ckpt.params)
  tensors = {key: _to_torch(_host(params[".".join(p)]).astype(dtype), n_in)
             for key, (p, _, n_in) in _table(ckpt.cfg, prefix).items()}
  if layout != "speculators" or ckpt.cfg.draft_vocab_size != ckpt.cfg.vocab_size:
    tensors["d2t"] = _host(ckpt.vocab.d2t).astype(np.int64)
    tensors["t2d"] = _host(ckpt.vocab.t2d).astype(bool)
  if embed is not None and include_embed:
    tensors[EMBED_KEY] = _host(embed).astype(dtype)
  files.write_dir_atomic(pathlib.Path(path), config, tensors, overwrite=overwrite)
