"""GGUF (llama.cpp) Llama-family checkpoints: metadata to LlamaConfig, dequantised tensors under HF names."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import time
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eagle3_jax.config import LlamaConfig, RopeScaling
from eagle3_jax.interop import files
from eagle3_jax.nn import layers
from eagle3_jax.target import hf

# general.architecture -> HF model_type. llama.cpp files Mistral under "llama" (same tensors and maths).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# Llama 3.1+ GGUFs carry llama3 RoPE scaling as a table of per-frequency divisors instead of metadata.
_ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str:
  """The transformers tensor name for a llama.cpp tensor name; unknown names raise ValueError."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _BLOCK.match(gguf_name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}"
  raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama-family equivalent")


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's convert_hf_to_gguf `permute` of Q/K rows (interleaved-pair RoPE -> rotate-half).

  llama.cpp reshapes each head's H rows to (2, H/2) and swaps axes, so row pairs (j, j+H/2) become adjacent.
  """
  H = w.shape[0] // n_head
  return w.reshape(n_head, H // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's own permutation (the inverse of unpermute_rope_rows), for writing GGUF test files."""
  H = w.shape[0] // n_head
  return w.reshape(n_head, 2, H // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_scaling_from_freqs(freqs: np.ndarray, head_dim: int, theta: float) -> RopeScaling:
  """Recovers RopeScaling from a rope_freqs table, checking it against the llama3 formula.

  llama.cpp's converter always writes low_freq_factor=1, high_freq_factor=4 defaults and an original
  context of 8192 unless the HF config says otherwise; the table only pins `factor` (its maximum) directly, so
  the guess is verified entry by entry rather than trusted.
  """
  inv = layers.rope_inv_freq(head_dim, theta)
  if freqs.shape != inv.shape:
    raise ValueError(f"GGUF tensor {_ROPE_FREQS!r} has shape {freqs.shape}, expected {inv.shape}")
  factor = float(freqs.max())
  for low, high, orig in [(1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 131072)]:
    guess = RopeScaling(factor=factor, low_freq_factor=low, high_freq_factor=high,
                        original_max_position_embeddings=orig)
    if np.allclose(inv / layers.rope_inv_freq(head_dim, theta, guess), freqs, rtol=1e-4):
      return guess
  raise ValueError(f"GGUF tensor {_ROPE_FREQS!r} does not match llama3 RoPE scaling with factor {factor} and "
                   "the converter's default low/high frequency factors")


def _f32(x: float) -> float:
  """GGUF stores floats as float32: 1e-5 comes back as 9.99999974e-06. Take the shortest decimal that is the
  same float32, which is what the original config.json said."""
  return float(str(np.float32(x)))


class GGUFFile:
  """A GGUF file seen as an HF checkpoint: `.hf_config` (config.json dict), `.shapes`, `.read(hf_name)`."""

  def __init__(self, path: str | os.PathLike):
    import gguf  # deferred: parsing GGUF costs seconds and HF-only users never need it

    self.path = os.fspath(path)
    self._reader = gguf.GGUFReader(self.path)
    self._dequantize = gguf.quants.dequantize
    self.arch = self._get("general.architecture")
    if self.arch not in GGUF_ARCHITECTURES:
      raise ValueError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; supported: "
                       f"{sorted(GGUF_ARCHITECTURES)}")
    tensors = {t.name: t for t in self._reader.tensors}
    rope_freqs = tensors.pop(_ROPE_FREQS, None)
    self._tensors = {hf_name(name): t for name, t in tensors.items()}
    self.shapes = {k: tuple(int(s) for s in reversed(t.shape)) for k, t in self._tensors.items()}
    self.hf_config = self._hf_config(rope_freqs)
    cfg = hf.llama_config_from_hf(self.hf_config)
    self.config = cfg
    # Only llama.cpp's "llama" architecture stores Q/K in the interleaved RoPE layout; qwen2/qwen3 use NeoX.
    self._permuted_heads = ({} if self.arch != "llama" else
                            {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads})

  def _get(self, key: str, default: Any = hf._MISSING) -> Any:
    field = self._reader.fields.get(key)
    if field is None:
      if default is hf._MISSING:
        raise ValueError(f"{self.path}: required GGUF metadata {key!r} is missing")
      return default
    return field.contents()

  def _hf_config(self, rope_freqs) -> dict[str, Any]:
    a = self.arch
    get = lambda k, *d: self._get(f"{a}.{k}", *d)
    hidden, heads = get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    for key, value in [("embedding_length", hidden), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads)]:
      if not isinstance(value, int) or value <= 0:  # a list here means per-layer head counts
        raise ValueError(f"{self.path}: {a}.{key} must be one positive int, got {value!r}")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
      raise ValueError(f"{self.path}: {a}.attention.value_length != {a}.attention.key_length")
    if get("rope.dimension_count", head_dim) != head_dim:
      raise ValueError(f"{self.path}: {a}.rope.dimension_count != head dim {head_dim} (partial RoPE)")
    context = get("context_length")
    window = get("attention.sliding_window", None)
    if window is not None and window < context:
      raise ValueError(f"{self.path}: {a}.attention.sliding_window={window} < context_length={context} would "
                       "change attention results; sliding-window attention is not supported")
    vocab = get("vocab_size", None)
    if vocab is None and "model.embed_tokens.weight" in self.shapes:
      vocab = self.shapes["model.embed_tokens.weight"][0]
    theta = _f32(get("rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type != "none":
      raise ValueError(f"{self.path}: {a}.rope.scaling.type {scaling_type!r} is not supported")
    if rope_freqs is not None:
      freqs = np.asarray(self._dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float32).reshape(-1)
      scaling = _llama3_scaling_from_freqs(freqs, head_dim, theta)
      rope = {"rope_type": "llama3", "rope_theta": theta, **dataclasses.asdict(scaling)}
    return {
        "model_type": GGUF_ARCHITECTURES[a], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"), "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": context, "rope_parameters": rope,
        "tie_word_embeddings": "lm_head.weight" not in self._tensors,
    }

  def read(self, name: str) -> np.ndarray:
    """The fp32 tensor in HF layout (dequantised, Q/K rows un-permuted)."""
    t = self._tensors[name]
    w = np.asarray(self._dequantize(t.data, t.tensor_type), np.float32).reshape(self.shapes[name])
    proj = name.split(".")[-2]
    if proj in self._permuted_heads:
      w = unpermute_rope_rows(w, self._permuted_heads[proj])
    return w


def load_gguf(path: str | os.PathLike, *, mesh: Mesh | None = None,
              dtype: Any = jnp.float32) -> tuple[LlamaConfig, Any]:
  """(cfg, params) straight from a GGUF file, dequantised to fp32 then cast to dtype, one tensor at a time."""
  f = GGUFFile(path)
  return f.config, hf.params_from_tensors(f.config, f.shapes, f.read, mesh=mesh, dtype=dtype)


# ----- conversion cache: GGUF -> fp32 HF directory -------------------------------------------------------------


def write_safetensors(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None):
  """Streams fp32 tensors into a .safetensors file in `shapes` order; only one tensor is in memory at a time."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape in shapes.items():
    size = 4 * math.prod(shape)
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    order = list(shapes)
    written = 0
    for name, array in tensors:
      if written >= len(order) or name != order[written] or tuple(array.shape) != tuple(shapes[name]):
        raise ValueError(f"tensor {name!r} {array.shape} does not match header entry {written} of {order}")
      f.write(np.ascontiguousarray(array, dtype="<f4").tobytes())
      written += 1
    if written != len(order):
      raise ValueError(f"{len(order) - written} header tensors were never written")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
  """Writes a GGUF as an HF directory (config.json + fp32 model.safetensors), streaming one tensor at a time."""
  f = GGUFFile(gguf_path)
  out_dir = pathlib.Path(out_dir)
  write_safetensors(out_dir / "model.safetensors", f.shapes, ((k, f.read(k)) for k in f.shapes))
  (out_dir / "config.json").write_text(json.dumps(hf.llama_config_to_hf(f.config), indent=2))
  (out_dir / "eagle3_jax_config.json").write_text(json.dumps(dataclasses.asdict(f.config), indent=2))
  st = os.stat(gguf_path)
  (out_dir / "source.json").write_text(json.dumps({"gguf": os.path.abspath(gguf_path), "size": st.st_size,
                                                   "mtime_ns": st.st_mtime_ns}))


def cached_gguf_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The HF directory converted from gguf_path, converting on first use (keyed by name, size and mtime)."""
  gguf_path = pathlib.Path(gguf_path)
  final = pathlib.Path(cache_dir or hf.cache_root()) / hf.cache_key(gguf_path)
  if (final / "config.json").is_file():
    return final
  t0 = time.perf_counter()
  files.atomic_dir(final, lambda tmp: convert_gguf(gguf_path, tmp))
  logging.info("converted %s to %s in %.1fs", gguf_path, final, time.perf_counter() - t0)
  return final
