"""Vanilla greedy tokens/s: our jitted JAX decode vs transformers `generate`, same target, prompts and run.

    python benchmarks/bench_vanilla.py [--target PATH] [--max-new-tokens 128] [--repeats 3] [--batch-sizes 1,4]

Both sides decode exactly max_new_tokens per prompt (EOS ignored), fp32, greedy; compilation and a warm-up
call are excluded. Runs are interleaved (ours, transformers, ours, ...) so machine noise hits both alike.
Also measures the memory copy bandwidth in the same run to give the floor: 4 x n_params bytes per decode step.
Prints a markdown summary and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import infer  # noqa: E402  (the built-in prompt set)


def copy_bandwidth(n_bytes: int, repeats: int = 5) -> dict[str, float]:
  """GB/s of a numpy copy (array bytes / time, the brief's measure) and of a read-only sum, best of repeats."""
  a = np.ones(n_bytes // 4, np.float32)
  b = np.empty_like(a)
  copy_t, read_t = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    np.copyto(b, a)
    copy_t.append(time.perf_counter() - t)
    t = time.perf_counter()
    a.sum()
    read_t.append(time.perf_counter() - t)
  return {"copy_gb_s": n_bytes / min(copy_t) / 1e9, "read_gb_s": n_bytes / min(read_t) / 1e9}


def hf_model_dir(target: str | None) -> pathlib.Path:
  """The HF directory transformers loads: the target itself, or the loader's conversion of a GGUF."""
  from eagle3_jax.target import gguf, load

  path = load.default_target_path() if target is None else pathlib.Path(target)
  return path if path.is_dir() else gguf.cached_gguf_dir(path)


def run_ours(generator, engine_mod, prompts: list[list[int]], batch_size: int, pad_id: int):
  """(seconds, new tokens, token lists) for all prompts, in batches of batch_size; shapes compiled beforehand."""
  eng = engine_mod.Engine(generator, None, batch_size=batch_size, pad_id=pad_id)
  seconds, tokens, outs = 0.0, 0, [None] * len(prompts)
  for idx, batch in eng.batches(prompts):
    t = time.perf_counter()
    out = generator.generate(batch)
    seconds += time.perf_counter() - t - out.stats["compile_s"]
    for row, i in enumerate(idx):
      outs[i] = out.tokens[row, :out.counts[row]].tolist()
      tokens += int(out.counts[row])
  return seconds, tokens, outs


def run_hf(model, torch, prompts: list[list[int]], max_new: int):
  seconds, tokens, outs = 0.0, 0, []
  for ids in prompts:
    x = torch.tensor([ids])
    t = time.perf_counter()
    with torch.inference_mode():
      y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                         do_sample=False, pad_token_id=0)
    seconds += time.perf_counter() - t
    outs.append(y[0, len(ids):].tolist())
    tokens += len(outs[-1])
  return seconds, tokens, outs


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default=None, help="HF dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batch-sizes", default="1,4", help="batch sizes for our decode (transformers runs batch 1)")
  ap.add_argument("--no-hf", action="store_true", help="skip transformers")
  ap.add_argument("--hf-threads", default=f"1,{os.cpu_count()}",
                  help="torch thread counts to time; the faster one is the baseline")
  args = ap.parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  load_start = round(os.getloadavg()[0], 2)  # the box is shared: record how busy it was
  hf_threads = [int(t) for t in args.hf_threads.split(",")]

  import jax
  import jax.numpy as jnp

  from eagle3_jax.decode import engine, sampling
  from eagle3_jax.params import count_params
  from eagle3_jax.target import hf, load

  jax.config.update("jax_compilation_cache_dir", str(hf.cache_root() / "xla"))  # as infer.py does
  cfg, params = load.load_target(args.target, dtype=jnp.float32)
  tokenizer = load.load_tokenizer(args.target)
  n_params = count_params(params)
  weight_bytes = 4 * n_params
  bw = copy_bandwidth(weight_bytes)
  requests = infer.default_requests()
  prompts = engine.Engine(None, tokenizer).encode(requests)
  pad_id = tokenizer.pad_token_id or 0
  M = args.max_new_tokens

  generator = engine.VanillaGenerator(params, cfg, sampling_cfg=sampling.SamplingConfig(), max_new_tokens=M,
                                      stop_ids=(), pad_id=pad_id)
  for b in batch_sizes:  # compile every shape and warm up once
    run_ours(generator, engine, prompts, b, pad_id)

  hf = None
  if not args.no_hf:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_model_dir(args.target), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like stop_ids=() on our side: exactly max_new_tokens each
    run_hf(hf, torch, prompts[:1], 4)  # warm-up

  times: dict[str, list[float]] = {}
  outs: dict[str, list] = {}
  n_tokens: dict[str, int] = {}
  for _ in range(args.repeats):
    for b in batch_sizes:
      s, n, o = run_ours(generator, engine, prompts, b, pad_id)
      times.setdefault(f"jax_b{b}", []).append(s)
      n_tokens[f"jax_b{b}"], outs[f"jax_b{b}"] = n, o
    for threads in ([] if hf is None else hf_threads):
      torch.set_num_threads(threads)
      s, n, o = run_hf(hf, torch, prompts, M)
      times.setdefault(f"hf_b1_t{threads}", []).append(s)
      n_tokens[f"hf_b1_t{threads}"], outs["hf_b1"] = n, o
  tok_s = {k: n_tokens[k] / statistics.median(v) for k, v in times.items()}
  if hf is not None:  # the baseline is torch at its best thread count in this run
    tok_s["hf_b1"] = max(v for k, v in tok_s.items() if k.startswith("hf_b1_t"))
  # Batch 1 reads every fp32 weight once per token and writes almost nothing, so the read-only rate is the floor;
  # the copy rate (array bytes / time, the brief's "memory copy" measure) gives a looser, lower one.
  floor_tok_s = bw["read_gb_s"] * 1e9 / weight_bytes
  copy_floor_tok_s = bw["copy_gb_s"] * 1e9 / weight_bytes

  result = {
      "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
      "load_avg_1m_start_end": [load_start, round(os.getloadavg()[0], 2)],
      "target": args.target or "embedded SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
      "n_params": n_params, "weight_mb": round(weight_bytes / 1e6, 1), "prompts": len(prompts),
      "max_new_tokens": M, "repeats": args.repeats, "jax": jax.__version__,
      **{k: round(v, 2) for k, v in bw.items()},
      "floor_tok_s_b1": round(floor_tok_s, 2), "copy_floor_tok_s_b1": round(copy_floor_tok_s, 2),
      "tokens_per_s": {k: round(v, 2) for k, v in tok_s.items()},
      "pct_of_floor_b1": round(100 * tok_s["jax_b1"] / floor_tok_s, 1) if "jax_b1" in tok_s else None,
  }
  if hf is not None:
    result["transformers"] = transformers.__version__
    for k in list(tok_s):
      if k.startswith("jax_"):
        result[f"ratio_{k}_vs_hf"] = round(tok_s[k] / tok_s["hf_b1"], 2)
    same = [a == b for a, b in zip(outs["jax_b1"], outs["hf_b1"])]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
              for a, b in zip(outs["jax_b1"], outs["hf_b1"])]
    result["greedy_identical_to_hf"] = f"{sum(same)}/{len(same)}"
    result["common_prefix_tokens"] = prefix
  for b in batch_sizes[1:]:
    if "jax_b1" in outs:
      same = sum(a == c for a, c in zip(outs["jax_b1"], outs[f"jax_b{b}"]))
      result[f"jax_b{b}_identical_to_b1"] = f"{same}/{len(prompts)}"
  print(f"| run | tokens/s (median of {args.repeats}) |\n|---|---|")
  for k, v in tok_s.items():
    print(f"| {k} | {v:.2f} |")
  print(f"| floor (batch 1, weights read once per token at the read-only rate) | {floor_tok_s:.2f} |")
  print(f"| floor at the copy rate | {copy_floor_tok_s:.2f} |")
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
