"""`python -m eagle3_jax.decode.autotree acceptance|predict`: a draft's acceptance file; the shapes ranked here."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eagle3_jax.decode.autotree import (
    ACCEPTANCE_FILE,
    Acceptance,
    acceptance,
    cached_costs,
    examples_from_rows,
    predict,
)
from eagle3_jax.decode.tree import TreeConfig
from eagle3_jax.target import protocol


def main(argv: Any = None) -> None:
  import argparse

  ap = argparse.ArgumentParser(prog="python -m eagle3_jax.decode.autotree",
                               description="Tree-shape choice for this machine (--tree auto).")
  sub = ap.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("acceptance", help=f"measure a draft's acceptance on greedy rows, write DRAFT/{ACCEPTANCE_FILE}")
  a.add_argument("--draft", required=True)
  a.add_argument("--rows", required=True, help="messages JSONL whose assistant turns are the target's greedy text")
  a.add_argument("--target", default=None)
  p = sub.add_parser("predict", help="calibrate (or read the cached calibration) and rank the shapes")
  p.add_argument("--draft", default=None, help="default: the shipped draft")
  p.add_argument("--target", default=None)
  p.add_argument("--batch-size", type=int, default=1)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens of every modelled request")
  p.add_argument("--batching", default="auto", choices=("auto", "static", "continuous"),
                 help="the engine's batching to model (auto: as infer.py, continuous at --batch-size > 1)")
  p.add_argument("--top", type=int, default=12)
  args = ap.parse_args(argv)

  from eagle3_jax import drafts
  from eagle3_jax.decode import engine
  from eagle3_jax.target import load

  path = args.draft or str(drafts.default_draft_path())
  cfg, params = load.load_target(args.target, dtype=jnp.float32)
  cfg, ckpt = engine.load_draft(path, cfg)
  target = protocol.llama_target(cfg)
  dparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), ckpt.params)
  if args.cmd == "acceptance":
    examples = examples_from_rows(args.rows, load.load_tokenizer(args.target))
    acc = acceptance(target, params, dparams, ckpt.vocab, ckpt.cfg, examples,
                     source=f"{pathlib.Path(args.rows).name}: {len(examples)} greedy rows")
    acc.save(pathlib.Path(path) / ACCEPTANCE_FILE)
    rates = acc.rates(1)[:, 0]
    print(f"{len(acc.ranks)} positions; chain acceptance per depth {np.round(rates, 3).tolist()}; "
          f"chain tau {[round(acc.tau(TreeConfig.chain(d)), 3) for d in range(1, 5)]}")
    return
  acc = Acceptance.load(pathlib.Path(path) / ACCEPTANCE_FILE)
  costs = cached_costs(target, params, cfg, dparams, ckpt.vocab, ckpt.cfg, batch=args.batch_size, verbose=True)
  for pred in predict(costs, acc, batch=args.batch_size, prompt_lengths=[args.prompt_len] * args.batch_size,
                      max_new_tokens=args.max_new_tokens, batching=args.batching if args.batching != "auto" else
                      ("continuous" if args.batch_size > 1 else "static"))[:args.top]:
    print(json.dumps(pred.as_dict()))


if __name__ == "__main__":
  main()
