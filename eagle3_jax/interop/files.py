"""The library's file helpers: the one atomic write (a file or a directory), the one safetensors reader (tensors and
metadata), and checkpoint tensor loading (safetensors, sharded, torch .bin)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import tempfile
import uuid
from typing import Any, Callable

import ml_dtypes
import numpy as np
import safetensors.numpy

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16))
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_BIN = "pytorch_model.bin"


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> None:
  """write(tmp) into a private sibling, then rename over `path`: readers see the old file or the new one, never a
  half-written one, even if the writer is killed."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def atomic_dir(final: pathlib.Path, fill: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Creates `final` by filling a private temp dir and renaming it: readers see all of it or nothing."""
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
  try:
    fill(tmp)
    os.rename(tmp, final)
  except OSError:
    if not final.is_dir():  # losing a race to another process is fine; anything else is not
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of one safetensors file, as numpy arrays in their stored dtypes."""
  from safetensors import safe_open

  with safe_open(str(path), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def as_float_dtype(dtype: Any) -> np.dtype:
  """np.dtype of a float dtype given as a string ("bfloat16", "fp16"), numpy/ml_dtypes/jnp dtype."""
  aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
  if isinstance(dtype, str):
    dtype = aliases.get(dtype, dtype)
  d = np.dtype(dtype)
  if d not in FLOAT_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {[str(f) for f in FLOAT_DTYPES]}")
  return d


def load_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist")
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path} does not hold a JSON object")
  return data


def _torch_to_numpy(name: str, t: Any) -> np.ndarray:
  import torch  # only reached when a .bin is read, i.e. torch is installed

  if not isinstance(t, torch.Tensor):
    raise ValueError(f"checkpoint entry {name!r} is a {type(t).__name__}, not a tensor")
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits, never round
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _load_bin(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{file} is a torch pickle; reading it needs torch (pip install 'eagle3-jax[torch]'), "
                      "or convert it to safetensors elsewhere") from e
  # weights_only=True: a checkpoint is data, never code (arbitrary pickles can execute anything on load).
  state = torch.load(file, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{file} holds a {type(state).__name__}, expected a state dict")
  return {str(k): _torch_to_numpy(str(k), v) for k, v in state.items()}


def _load_one(file: pathlib.Path) -> dict[str, np.ndarray]:
  if file.name.endswith(".safetensors"):
    return safetensors.numpy.load_file(str(file))
  return _load_bin(file)


def load_tensors(path: pathlib.Path) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a checkpoint directory, in their file dtypes, and the weight file name they came from.

  Prefers model.safetensors over pytorch_model.bin; follows *.index.json for sharded checkpoints.
  """
  for name in (WEIGHTS_SAFETENSORS, WEIGHTS_BIN):
    if (path / name).is_file():
      return _load_one(path / name), name
    index = path / f"{name}.index.json"
    if index.is_file():
      weight_map = load_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map' object")
      tensors: dict[str, np.ndarray] = {}
      for shard in sorted(set(weight_map.values())):
        for key, value in _load_one(path / shard).items():
          if key in tensors:
            raise ValueError(f"key {key!r} appears in more than one shard of {path}")
          tensors[key] = value
      return tensors, index.name
  raise FileNotFoundError(f"{path} holds no {WEIGHTS_SAFETENSORS}, {WEIGHTS_BIN} or sharded index")


def write_dir_atomic(dst: pathlib.Path, config: dict[str, Any], tensors: dict[str, np.ndarray], *,
                     overwrite: bool) -> None:
  """Writes config.json + model.safetensors into a temporary sibling directory, then renames it into place.

  A crash or an exception leaves either the previous directory or none, never a partial checkpoint.
  """
  dst = pathlib.Path(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
  if dst.exists() and not dst.is_dir():
    raise FileExistsError(f"{dst} exists and is not a directory")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    with open(tmp / "config.json", "w") as f:
      json.dump(config, f, indent=2)
      f.write("\n")
    # "format": "pt" is what transformers, vLLM and SGLang expect in a safetensors header.
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(tmp / WEIGHTS_SAFETENSORS), metadata={"format": "pt"})
    # safetensors creates its file 0600; give it the umask-derived mode config.json got, so servers can read it.
    os.chmod(tmp / WEIGHTS_SAFETENSORS, stat.S_IMODE(os.stat(tmp / "config.json").st_mode))
    for name in ("config.json", WEIGHTS_SAFETENSORS):
      fd = os.open(tmp / name, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if dst.exists():
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, old)
  try:
    os.rename(tmp, dst)
  except BaseException:
    if old is not None:
      os.rename(old, dst)  # put the previous checkpoint back
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
