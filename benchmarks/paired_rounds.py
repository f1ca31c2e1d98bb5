"""Two drafts on the same prompts, compared by rounds per request (greedy: both emit the target's tokens, so the
rounds needed for the same tokens compare per prompt, and the paired difference has a small standard error).

    python infer.py --prompts P --draft A --draft-top-k 1 --draft-depth 4 --draft-tokens 4 --temperature 0 \\
        --max-new-tokens 96 --batch-size 4 --output a.jsonl      # and the same with --draft B --output b.jsonl
    python benchmarks/paired_rounds.py a.jsonl b.jsonl

tau here is tokens / rounds (the prefill's token counted, ~0.01 above infer.py's accepted / rounds).
"""

from __future__ import annotations

import argparse
import json
import math


def load(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def compare(a: list[dict], b: list[dict]) -> dict:
  if len(a) != len(b):
    raise SystemExit(f"the files hold {len(a)} and {len(b)} requests: not the same prompts")
  same = sum(x["token_ids"] == y["token_ids"] for x, y in zip(a, b))
  d = [y["rounds"] - x["rounds"] for x, y in zip(a, b)]
  n = len(d)
  mean = sum(d) / n
  sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
  tokens = sum(x["tokens"] for x in a)
  ra, rb = sum(x["rounds"] for x in a), sum(y["rounds"] for y in b)
  return {"requests": n, "identical_tokens": same, "tokens": tokens, "rounds_a": ra, "rounds_b": rb,
          "tau_a": round(tokens / ra, 4), "tau_b": round(sum(y["tokens"] for y in b) / rb, 4),
          "tau_gain": round(ra / rb - 1, 4), "fewer_rounds_b": sum(v < 0 for v in d),
          "more_rounds_b": sum(v > 0 for v in d),
          "mean_diff": round(mean, 3), "stderr": round(sd / math.sqrt(n), 3)}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("a")
  ap.add_argument("b")
  args = ap.parse_args(argv)
  print(json.dumps(compare(load(args.a), load(args.b))))


if __name__ == "__main__":
  main()
