"""HF checkpoints of the Llama family: config.json <-> LlamaConfig, the tensor-name table, safetensors
directories straight into shardings, and the conversion cache both HF and GGUF loading use."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eagle3_jax import sharding as sharding_lib
from eagle3_jax.config import LlamaConfig, RopeScaling
from eagle3_jax.target import llama

# ----- config.json <-> LlamaConfig ------------------------------------------------------------------------------

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_MISSING = object()


def _field(d: Mapping, key: str, kind: type, default: Any = _MISSING, where: str = "config") -> Any:
  """Reads d[key] checking its JSON type; a missing key without a default is an error naming it."""
  value = d.get(key, _MISSING)
  if value is _MISSING or value is None:
    if default is _MISSING:
      raise ValueError(f"{where}: required field {key!r} is missing")
    return default
  ok = (isinstance(value, bool) if kind is bool else
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, kind) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
  if not ok:
    raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
  if kind is int and value <= 0:
    raise ValueError(f"{where}: field {key!r} must be positive, got {value}")
  return float(value) if kind is float else value


def _rope_from_hf(d: Mapping) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from transformers 5 `rope_parameters` or the older rope_theta / rope_scaling keys."""
  params = d.get("rope_parameters")
  if params is not None:
    where = "config.rope_parameters"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
      raise ValueError(f"{where} must be one flat dict (per-layer-type RoPE is not supported), got {params!r}")
    theta = _field(params, "rope_theta", float, _field(d, "rope_theta", float, 10000.0), where)
  else:
    where = "config.rope_scaling"
    theta = _field(d, "rope_theta", float, 10000.0)
    params = _field(d, "rope_scaling", dict, {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if _field(params, "partial_rotary_factor", float, 1.0, where) != 1.0:
    raise ValueError(f"{where}.partial_rotary_factor != 1 (partial RoPE) is not supported")
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"{where}: unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")
  return theta, RopeScaling(
      factor=_field(params, "factor", float, where=where),
      low_freq_factor=_field(params, "low_freq_factor", float, where=where),
      high_freq_factor=_field(params, "high_freq_factor", float, where=where),
      original_max_position_embeddings=_field(params, "original_max_position_embeddings", int, where=where))


def llama_config_from_hf(hf_config: Mapping[str, Any]) -> LlamaConfig:
  """LlamaConfig from a config.json dict; anything that would make our forward differ from HF's is refused."""
  d = hf_config
  model_type = _field(d, "model_type", str)
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"config: unsupported model_type {model_type!r}; supported: {sorted(_ARCHITECTURES)}")
  for arch in _field(d, "architectures", list, []):
    if arch not in _ARCHITECTURES.values():
      raise ValueError(f"config: unsupported architectures entry {arch!r}; supported: "
                       f"{sorted(_ARCHITECTURES.values())}")
  act = d.get("hidden_act", d.get("hidden_activation", "silu"))
  if act != "silu":
    raise ValueError(f"config: hidden_act {act!r} is not supported (only 'silu')")
  if _field(d, "mlp_bias", bool, False):
    raise ValueError("config: mlp_bias=true is not supported")
  if model_type != "qwen2" and _field(d, "attention_bias", bool, False):
    # Llama/Mistral/Qwen3 put this bias on o_proj too, which our attention block does not have.
    raise ValueError(f"config: attention_bias=true is not supported for model_type {model_type!r}")
  hidden, heads = _field(d, "hidden_size", int), _field(d, "num_attention_heads", int)
  if d.get("head_dim") is None and hidden % heads:
    raise ValueError(f"config: hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                     "and head_dim is not given")
  head_dim = _field(d, "head_dim", int, hidden // heads)
  max_pos = _field(d, "max_position_embeddings", int)
  window = None
  if model_type == "mistral" or _field(d, "use_sliding_window", bool, False):
    window = _field(d, "sliding_window", int, None)
  if "sliding_attention" in _field(d, "layer_types", list, []):
    window = _field(d, "sliding_window", int, 0)
  if window is not None and window < max_pos:
    raise ValueError(f"config: sliding_window={window} < max_position_embeddings={max_pos} would change "
                     "attention results; sliding-window attention is not supported")
  theta, scaling = _rope_from_hf(d)
  return LlamaConfig(
      vocab_size=_field(d, "vocab_size", int), hidden_size=hidden,
      intermediate_size=_field(d, "intermediate_size", int), num_layers=_field(d, "num_hidden_layers", int),
      num_heads=heads, num_kv_heads=_field(d, "num_key_value_heads", int, heads), head_dim=head_dim,
      rms_norm_eps=_field(d, "rms_norm_eps", float, 1e-6), rope_theta=theta, rope_scaling=scaling,
      tie_word_embeddings=_field(d, "tie_word_embeddings", bool, False),
      attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", max_position_embeddings=max_pos)


def llama_config_to_hf(cfg: LlamaConfig, model_type: str | None = None) -> dict[str, Any]:
  """A transformers-5 config.json dict for cfg (round-trips through llama_config_from_hf)."""
  inferred = "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"
  model_type = model_type or inferred
  if model_type not in _ARCHITECTURES or (inferred != "llama" and model_type != inferred) or (
      inferred == "llama" and model_type not in ("llama", "mistral")):
    raise ValueError(f"model_type {model_type!r} cannot express attention_bias={cfg.attention_bias}, "
                     f"qk_norm={cfg.qk_norm}")
  if model_type == "qwen2" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    raise ValueError("qwen2 configs have no head_dim field: head_dim must equal hidden_size // num_heads")
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **dataclasses.asdict(cfg.rope_scaling)}
  out = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
      "tie_word_embeddings": cfg.tie_word_embeddings, "rope_parameters": rope, "dtype": "float32",
  }
  if model_type == "qwen2":
    del out["head_dim"]
  if model_type in ("mistral", "qwen2", "qwen3"):
    out["sliding_window"] = None
  if model_type in ("qwen2", "qwen3"):
    out["use_sliding_window"] = False
  if model_type in ("llama", "qwen3"):
    out["attention_bias"] = False
  return out


# ----- HF tensor names -> our param tree ------------------------------------------------------------------------

# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[Any, ...]  # where the converted array goes in the param tree
  hf_shape: tuple[int, ...]
  convert: Callable[[np.ndarray], np.ndarray]  # HF layout -> ours; returns views where it can


def hf_tensor_table(cfg: LlamaConfig) -> dict[str, _Entry]:
  """Every HF tensor name the config implies, with its shape and its conversion to our layout."""
  D, F, N, K, H, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.vocab_size)
  same = lambda w: w
  t = lambda w: w.T  # HF Linear weights are [out, in]; ours are [in, out]
  table = {"model.embed_tokens.weight": _Entry(("embed",), (V, D), same),
           "model.norm.weight": _Entry(("final_norm",), (D,), same)}
  if not cfg.tie_word_embeddings:
    table["lm_head.weight"] = _Entry(("lm_head",), (V, D), t)
  for i in range(cfg.num_layers):
    pre, at = f"model.layers.{i}.", ("layers", i)
    table |= {
        pre + "input_layernorm.weight": _Entry(at + ("attn_norm",), (D,), same),
        pre + "post_attention_layernorm.weight": _Entry(at + ("mlp_norm",), (D,), same),
        pre + "self_attn.q_proj.weight": _Entry(at + ("wq",), (N * H, D), lambda w: w.T.reshape(D, N, H)),
        pre + "self_attn.k_proj.weight": _Entry(at + ("wk",), (K * H, D), lambda w: w.T.reshape(D, K, H)),
        pre + "self_attn.v_proj.weight": _Entry(at + ("wv",), (K * H, D), lambda w: w.T.reshape(D, K, H)),
        pre + "self_attn.o_proj.weight": _Entry(at + ("wo",), (D, N * H), lambda w: w.T.reshape(N, H, D)),
        pre + "mlp.gate_proj.weight": _Entry(at + ("w_gate",), (F, D), t),
        pre + "mlp.up_proj.weight": _Entry(at + ("w_up",), (F, D), t),
        pre + "mlp.down_proj.weight": _Entry(at + ("w_down",), (D, F), t),
    }
    if cfg.attention_bias:
      table |= {pre + "self_attn.q_proj.bias": _Entry(at + ("bq",), (N * H,), lambda b: b.reshape(N, H)),
                pre + "self_attn.k_proj.bias": _Entry(at + ("bk",), (K * H,), lambda b: b.reshape(K, H)),
                pre + "self_attn.v_proj.bias": _Entry(at + ("bv",), (K * H,), lambda b: b.reshape(K, H))}
    if cfg.qk_norm:
      table |= {pre + "self_attn.q_norm.weight": _Entry(at + ("q_norm",), (H,), same),
                pre + "self_attn.k_norm.weight": _Entry(at + ("k_norm",), (H,), same)}
  return table


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set(tree: Any, path: tuple[Any, ...], value: Any) -> None:
  _get(tree, path[:-1])[path[-1]] = value


def _names(keys: Iterable[str], limit: int = 8) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def params_from_tensors(cfg: LlamaConfig, shapes: Mapping[str, tuple[int, ...]],
                        read: Callable[[str], np.ndarray], *, mesh: Mesh | None = None,
                        dtype: Any = jnp.float32) -> Any:
  """Builds the param tree from HF-named tensors, reading and placing one tensor at a time.

  `shapes` lists every tensor the checkpoint holds; all of them are checked (missing, unexpected, wrong shape)
  before anything is read. With a mesh each array goes straight into its NamedSharding: every device receives
  only its own slice of the host array, so no device ever holds a whole unsharded weight.
  """
  table = hf_tensor_table(cfg)
  present = {k for k in shapes if not _IGNORED.search(k)}
  tied_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  if missing := table.keys() - present:
    raise ValueError(f"checkpoint is missing tensors: {_names(missing)}")
  if unexpected := present - table.keys() - tied_extra:
    raise ValueError(f"checkpoint has unexpected tensors: {_names(unexpected)}")
  for key in sorted(present):
    want = table[key].hf_shape if key in table else table["model.embed_tokens.weight"].hf_shape
    if tuple(shapes[key]) != want:
      raise ValueError(f"tensor {key!r} has shape {tuple(shapes[key])}, expected {want}")
  if tied_extra & present and not np.array_equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
    raise ValueError("tie_word_embeddings is true but tensor 'lm_head.weight' differs from the embedding")

  specs = llama.param_specs(cfg)
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.tree_shardings(mesh, llama.param_axes(cfg), llama.abstract_params(cfg, dtype))
  np_dtype = jnp.dtype(dtype)
  params: dict[str, Any] = {"layers": [{} for _ in range(cfg.num_layers)]}
  for key, entry in table.items():
    host = entry.convert(read(key))
    want = _get(specs, entry.path).shape
    assert host.shape == want, (key, host.shape, want)
    # np.array copies: `host` may be a view of a read-only memory map, which JAX could otherwise alias on CPU
    # (and a donated buffer would then be written in place).
    if shardings is None:
      value = jnp.asarray(np.array(host, np_dtype))
    else:
      value = jax.make_array_from_callback(
          want, _get(shardings, entry.path), lambda index, host=host: np.array(host[index], np_dtype))
    _set(params, entry.path, value)
  return params


# ----- safetensors (memory-mapped; numpy has no bfloat16, so safetensors' own numpy API cannot read most
# real checkpoints; the format is a JSON header and raw little-endian bytes) --------------------------------

_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
              "BF16": jnp.dtype(jnp.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
              "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?")}


class SafetensorsReader:
  """Read-only view of one or more .safetensors files: `.shapes` by name, `.read(name)` a memory-mapped array."""

  def __init__(self, files: Iterable[str | os.PathLike]):
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._where: dict[str, tuple[np.memmap, str, int, int]] = {}
    for file in files:
      with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
      buf = np.memmap(file, dtype=np.uint8, mode="r")
      for name, info in header.items():
        if name == "__metadata__":
          continue
        if name in self._where:
          raise ValueError(f"tensor {name!r} appears in more than one safetensors file ({file})")
        if info["dtype"] not in _ST_DTYPES:
          raise ValueError(f"tensor {name!r} in {file} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        self.shapes[name] = tuple(info["shape"])
        self._where[name] = (buf, info["dtype"], 8 + n + start, 8 + n + end)

  def read(self, name: str) -> np.ndarray:
    buf, dt, start, end = self._where[name]
    return buf[start:end].view(_ST_DTYPES[dt]).reshape(self.shapes[name])


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: field 'weight_map' is missing or not a dict")
    files = sorted(set(weight_map.values()))
    for f in files:
      if not (path / f).is_file():
        raise ValueError(f"{index} names shard {f!r}, which does not exist")
    return [path / f for f in files]
  if (path / "model.safetensors").is_file():
    return [path / "model.safetensors"]
  raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def load_hf(path: str | os.PathLike, *, mesh: Mesh | None = None,
            dtype: Any = jnp.float32) -> tuple[LlamaConfig, Any]:
  """(cfg, params) from a Hugging Face directory: config.json + model.safetensors or a sharded index."""
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise ValueError(f"{path} has no config.json")
  cfg = llama_config_from_hf(json.loads(cfg_file.read_text()))
  reader = SafetensorsReader(_safetensors_files(path))
  return cfg, params_from_tensors(cfg, reader.shapes, reader.read, mesh=mesh, dtype=dtype)


# ----- the conversion cache ------------------------------------------------------------------------------------

_CACHE_VERSION = "v1"  # bump when the cached layout changes, so stale conversions are never read


def cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get("EAGLE3_JAX_CACHE") or pathlib.Path.home() / ".cache" / "eagle3_jax")


def cache_key(gguf_path: pathlib.Path) -> str:
  st = gguf_path.stat()
  return f"{gguf_path.stem}-{st.st_size}-{st.st_mtime_ns}-{_CACHE_VERSION}"
