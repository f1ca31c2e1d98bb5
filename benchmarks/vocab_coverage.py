"""Draft-vocabulary coverage: the share of assistant tokens a draft vocabulary of size Vd can propose at all.

    python benchmarks/vocab_coverage.py --source runs/regen/sharegpt_t0.jsonl --sizes 4096,8192,12288,16384,24576

The vocabulary is built as training builds it (the Vd most frequent assistant tokens of the training split) and
measured twice: in sample (the training split itself) and held out (the eval split, `--eval-fraction` of the rows,
the same split train.py makes), because a position whose token is outside the vocabulary can never be accepted.
A token the draft cannot propose costs acceptance only where the draft would have guessed it, so this is an upper
bound on the acceptance a smaller Vd loses; what it saves is the head's read per tree level (576 x Vd weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--source", required=True)
  ap.add_argument("--sizes", default="4096,8192,12288,16384,24576")
  ap.add_argument("--eval-fraction", type=float, default=0.03)
  ap.add_argument("--max-length", type=int, default=1152)
  args = ap.parse_args(argv)
  from eagle3_jax.train import data
  from eagle3_jax.draft import vocab
  from eagle3_jax.target import load

  tok = load.load_tokenizer(None)
  V = len(tok)
  cfg = data.DataConfig(source=args.source, eval_fraction=args.eval_fraction, max_length=args.max_length,
                        overflow="drop", batch_size=1)
  train, n_train = vocab.count_tokens(data.iterate_examples(cfg, tok, split="train"), V)
  held, n_held = vocab.count_tokens(data.iterate_examples(dataclasses.replace(cfg), tok, split="eval"), V)
  rows = []
  print(f"train: {n_train} rows, {train.sum()} assistant tokens, {(train > 0).sum()} distinct; "
        f"held out: {n_held} rows, {held.sum()} tokens")
  print("| Vd | in-sample coverage | held-out coverage | head MB (fp32) |")
  print("|---|---|---|---|")
  for Vd in (int(x) for x in args.sizes.split(",")):
    _, t2d = vocab.vocab_from_counts(train, Vd)
    row = {"Vd": Vd, "in_sample": float(train[t2d].sum() / train.sum()),
           "held_out": float(held[t2d].sum() / max(held.sum(), 1))}
    rows.append(row)
    print(f"| {Vd} | {row['in_sample']:.4f} | {row['held_out']:.4f} | {576 * Vd * 4 / 1e6:.1f} |")
  print(json.dumps(rows))
  return rows


if __name__ == "__main__":
  main()
