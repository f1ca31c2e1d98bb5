"""`--tree auto` against measurement: predicted and measured tau and tokens/s for plain decoding and several tree
shapes, at each batch size, on held-out prompts, in one run (same process, same machine state).

    python benchmarks/prompt_sets.py --out runs/bench          # held-out ShareGPT + HumanEval question files
    python benchmarks/bench_autotree.py --prompts runs/bench/sharegpt_heldout.jsonl --questions 8 \\
        --max-new-tokens 64 --batch-sizes 1,4 --repeats 3

The calibration is made fresh (--cache-dir, emptied first) so it is measured under the same conditions as the
shapes. Predictions come from autotree as infer.py makes them (the draft's acceptance.safetensors, the calibration
at this batch size, the engine's batches of these prompts), less the first-run cost of new executables
(`first_runs=False`): measurements run infer.py's own path (`engine.make_generator` with the shape given by hand, a
new generator each run; `infer.serve`; tokens/s without compilation, prefill included, EOS respected) after
--warmup untimed runs of every shape, which compile and make those first runs (a fresh generator over executables
this process has run costs what the same generator's repeat does: 8 prompts at batch 1, 15.0/15.7/14.5 s against
15.0/15.2/14.3 s; the first run after compiling, 16.4 s). The auto choice is `autotree.choose` for those warm passes
(first_runs=False); infer.py's for one cold run (first runs priced: plain decoding's are cheaper) is printed and
recorded beside it ("auto_cold"). Prints a markdown table and, last, one JSON line.

This machine's speed drifts by 10-40% within an hour (BENCHMARKS.md "Tree choice"), while the shapes' predicted
tokens/s differ by 5-15%. So every shape is run --repeats times, the passes interleaved (shapes in order, then in
reverse order, ...), and its median tokens/s is what is compared; and the engine's plain decode step is timed just
before and just after each run (a few seconds, the calibration's own method): "rescaled" predictions are the
calibrated ones times calibrated step / the median of those step timings, i.e. the same model at the machine's
speed while that shape ran. Both are printed; the rescaling uses no timing of the shape itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eagle3_jax.target import protocol  # noqa: E402  (after the path: runs from a checkout without an install)

def unload() -> int:
  """Drops every executable jax's caches hold (XLA:CPU keeps each loaded one's code mapped into the process: see
  main); returns the process's memory mappings before, -1 where /proc is not there."""
  import jax

  maps = sum(1 for _ in open("/proc/self/maps")) if pathlib.Path("/proc/self/maps").is_file() else -1
  jax.clear_caches()
  gc.collect()
  return maps


SHAPES = "none,1x1x1,1x2x2,1x3x3,1x4x4,2x2x4,2x3x6,3x3x8,4x4x16"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--draft", default=None, help="default: the shipped draft")
  ap.add_argument("--prompts", required=True)
  ap.add_argument("--questions", type=int, default=8)
  ap.add_argument("--max-new-tokens", type=int, default=64)
  ap.add_argument("--batch-sizes", default="1,4")
  ap.add_argument("--shapes", default=SHAPES, help="comma list of KxDxP or 'none'")
  ap.add_argument("--cache-dir", default="runs/bench/autotree_cache")
  ap.add_argument("--repeats", type=int, default=3, help="runs of every shape, interleaved; the median counts")
  ap.add_argument("--warmup", type=int, default=1, help="untimed runs of every shape first (first-run work)")
  ap.add_argument("--batching", default="auto", choices=("auto", "static", "continuous"),
                  help="as infer.py's (auto: continuous at batch > 1); predictions model the same")
  args = ap.parse_args(argv)
  if args.repeats < 1:
    ap.error(f"--repeats must be >= 1, got {args.repeats}")
  import jax
  import jax.numpy as jnp

  import infer
  from eagle3_jax import drafts
  from eagle3_jax.decode import autotree, engine, sampling
  from eagle3_jax.decode.autotree import costs as autotree_costs
  from eagle3_jax.decode.tree import TreeConfig
  from eagle3_jax.target import hf, load

  draft_dir = args.draft or str(drafts.default_draft_path())
  lines = pathlib.Path(args.prompts).read_text().splitlines()[:args.questions]
  tmp = tempfile.TemporaryDirectory()
  qfile = pathlib.Path(tmp.name) / "q.jsonl"
  qfile.write_text("\n".join(lines) + "\n")
  requests = infer.read_jsonl(str(qfile))
  cfg, params = load.load_target(None, dtype=jnp.float32)
  tokenizer = load.load_tokenizer(None)
  cfg, ckpt = engine.load_draft(draft_dir, cfg)
  target = protocol.llama_target(cfg)
  dparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ckpt.params)
  first = [{"messages": [{"role": "user", "content": r["turns"][0]}]} if "turns" in r else r for r in requests]
  prompt_ids = engine.Engine(None, tokenizer).encode(first)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  common = dict(sampling_cfg=sampling.SamplingConfig(temperature=0.0), max_new_tokens=args.max_new_tokens,
                stop_ids=engine.stop_ids(tokenizer, None), pad_id=pad_id, seed=0)
  # As infer.py: executables come from the compilation cache after the first pass, as for a repeated infer.py run.
  jax.config.update("jax_compilation_cache_dir", str(hf.cache_root() / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  acc = autotree.Acceptance.load(pathlib.Path(draft_dir) / autotree.ACCEPTANCE_FILE)
  shutil.rmtree(args.cache_dir, ignore_errors=True)
  parse = lambda s: None if s == "none" else TreeConfig(**dict(zip(("top_k", "depth", "total_tokens"),  # noqa: E731
                                                                   map(int, s.split("x")))))
  shapes = [parse(s) for s in args.shapes.split(",")]
  rows, choices = [], {}
  with tmp:
    for B in (int(b) for b in args.batch_sizes.split(",")):
      costs = autotree.cached_costs(target, params, cfg, dparams, ckpt.vocab, ckpt.cfg, batch=B,
                                    cache_dir=args.cache_dir, verbose=True)
      unload()  # the calibration's executables
      lens = [len(x) for x in prompt_ids]
      mode = args.batching if args.batching != "auto" else ("continuous" if B > 1 else "static")
      # Measured runs come after a warm-up run of the same executables, so they are compared with the model
      # without first runs, and so is the choice below.
      preds = autotree.predict(costs, acc, batch=B, prompt_lengths=lens, max_new_tokens=args.max_new_tokens,
                               batching=mode, first_runs=False)
      # The choice for what is measured (warm passes: first runs not priced), the margin over plain decoding
      # included; infer.py's own, for one cold run (first runs priced, plain decoding's cheaper), is printed too.
      best = autotree.choose(costs, acc, batch=B, prompt_lengths=lens, max_new_tokens=args.max_new_tokens,
                             batching=mode, first_runs=False)
      cold = autotree.choose(costs, acc, batch=B, prompt_lengths=lens, max_new_tokens=args.max_new_tokens,
                             batching=mode)
      print(f"batch {B}: auto chooses {autotree.shape_str(best.tree)} for warm passes, "
            f"{autotree.shape_str(cold.tree)} for one cold run (infer.py)", file=sys.stderr, flush=True)
      step_now = []  # the engine's decode step, compiled once, timed again around every run
      autotree_costs.decode_step_cost(params, cfg, batch=B, cache_len=autotree.CACHE_LENS[0], n=8, first=[],
                                       keep=step_now)
      by_shape = {autotree.shape_str(p.tree): p for p in preds}
      todo = list(shapes) + ([best.tree] if best.tree not in shapes else [])
      runs = {autotree.shape_str(t): [] for t in todo}  # per shape: (summary, step before, step after) per pass
      for r in range(-args.warmup, args.repeats):
        for tcfg in (todo if r % 2 == 0 else todo[::-1]):
          gen = engine.make_generator(params, cfg, draft_ckpt=None if tcfg is None else ckpt, tree_cfg=tcfg,
                                      slots=B if mode == "continuous" else None, **common)
          before = step_now[0]()
          _, s = infer.serve(engine.Engine(gen, tokenizer, batch_size=B, pad_id=pad_id), requests,
                             multi_turn=False, progress=False)
          if r >= 0:  # warm-up passes (r < 0) compile and make the executables' first runs: not counted
            runs[autotree.shape_str(tcfg)].append((s, before, step_now[0]()))
          print(f"pass {r} B {B} {autotree.shape_str(tcfg)}: {s['tokens_per_s']:.2f} tokens/s, tau {s['tau']}",
                file=sys.stderr, flush=True)
      for tcfg in todo:
        name = autotree.shape_str(tcfg)
        done = runs[name]
        speeds = [x[0]["tokens_per_s"] for x in done]
        measured = float(np.median(speeds))
        scale = costs.step / float(np.median([t for x in done for t in x[1:]]))
        p = by_shape.get(name) or autotree.predict(costs, acc, batch=B, prompt_lengths=lens,
                                                   max_new_tokens=args.max_new_tokens, shapes=[tcfg],
                                                   batching=mode, first_runs=False)[0]
        row = {"batch": B, "batching": mode, "tree": name, "predicted_tau": round(p.tau, 3),
               "tau": done[0][0]["tau"], "predicted_tokens_per_s": round(p.tokens_per_s, 2),
               "tokens_per_s": round(measured, 3), "runs_tokens_per_s": speeds,
               "error": round(p.tokens_per_s / measured - 1, 4), "speed_scale": round(scale, 4),
               "rescaled_tokens_per_s": round(p.tokens_per_s * scale, 2),
               "rescaled_error": round(p.tokens_per_s * scale / measured - 1, 4),
               "auto": name == autotree.shape_str(best.tree)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
      # XLA:CPU maps every loaded executable's code into the process, and executables stay loaded while jax's caches
      # hold them: a 24-prompt run of both batch sizes crashed at its 17th batch-4 shape pass with "LLVM compilation
      # error: Cannot allocate memory" at Linux's default vm.max_map_count (65,530 mappings). The next batch size
      # needs none of this one's executables.
      print(f"batch {B}: {unload()} memory mappings before clearing jax's caches", file=sys.stderr, flush=True)
      measured = [r for r in rows if r["batch"] == B]
      top = max(measured, key=lambda r: r["tokens_per_s"])
      mine = next(r for r in measured if r["auto"])
      plain = next((r for r in measured if r["tree"] == "none"), None)
      choices[B] = {"auto": mine["tree"], "auto_cold": autotree.shape_str(cold.tree),
                    "auto_tokens_per_s": mine["tokens_per_s"], "best_measured": top["tree"],
                    "best_tokens_per_s": top["tokens_per_s"], "auto_vs_best": round(mine["tokens_per_s"] /
                                                                                    top["tokens_per_s"], 4),
                    "auto_vs_plain": round(mine["tokens_per_s"] / plain["tokens_per_s"], 4) if plain else None,
                    "calibration": costs.to_json()}
  print("| batch | tree | predicted tau | measured tau | predicted tokens/s | error | machine speed | rescaled "
        "prediction | measured tokens/s | rescaled error |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['tree']}{' (auto)' if r['auto'] else ''} | {r['predicted_tau']:.2f} | {r['tau']:.2f} | "
          f"{r['predicted_tokens_per_s']:.1f} | {r['error']:+.1%} | {r['speed_scale']:.2f} | "
          f"{r['rescaled_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['rescaled_error']:+.1%} |")
  for B, c in choices.items():
    print(f"\nbatch {B}: auto chose {c['auto']} ({c['auto_tokens_per_s']:.1f} tokens/s), best measured "
          f"{c['best_measured']} ({c['best_tokens_per_s']:.1f}): {c['auto_vs_best']:.3f} of the best, "
          f"{c['auto_vs_plain']}x plain decoding")
  out = {"rows": rows, "choices": choices}
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
