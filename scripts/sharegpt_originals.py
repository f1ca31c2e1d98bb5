"""Phase 2 data of the shipped draft: a run's regenerated rows split as that run split them, plus ShareGPT first
turns with ShareGPT's own answers, for a warm-started run that fights memorisation of a small regenerated set.

    python scripts/sharegpt_originals.py runs/smollm2_135m/data.jsonl --out runs/smollm2_mix --rows 420

Writes OUT/regen_train.jsonl and OUT/eval.jsonl (the rows `DataConfig(eval_fraction=F)` would hold out, so both
runs are evaluated on the same rows) and OUT/sharegpt_orig.jsonl: first user turns of shuffled ShareGPT positions
16000..17000 (never regenerated for training: regeneration stops at 16000; never benchmark prompts: those start
at 17000) with the first answer cut at a word boundary near `--max-answer-chars`. The target labels these rows
like any other (soft targets from its own distribution); only the inputs are off-policy. Then, e.g.:

    python train.py --config configs/smollm2_135m.py run_dir=runs/smollm2_mix feature_dir=runs/smollm2_mix/features \\
      data.source=runs/smollm2_mix/regen_train.jsonl,runs/smollm2_mix/sharegpt_orig.jsonl data.eval_fraction=0 \\
      data.eval_source=runs/smollm2_mix/eval.jsonl init_from=runs/smollm2_135m/export_step_500 num_steps=450 \\
      ttt.schedule=0:3,175:5 optim.warmup_steps=20 eval_every=125 export_every=125
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("regen", help="the regenerated rows a run trained on (JSONL)")
  ap.add_argument("--out", required=True)
  ap.add_argument("--rows", type=int, default=420, help="ShareGPT-original rows to write")
  ap.add_argument("--start", type=int, default=16000, help="first shuffled ShareGPT position to read")
  ap.add_argument("--stop", type=int, default=17000,
                  help="last position + 1; at most 17000, where the benchmark prompts begin")
  ap.add_argument("--eval-fraction", type=float, default=0.05, help="as the run's data.eval_fraction")
  ap.add_argument("--max-prompt-chars", type=int, default=2000)
  ap.add_argument("--max-answer-chars", type=int, default=1200)
  args = ap.parse_args(argv)
  from eagle3_jax.train import chat, data, sources, regenerate

  if not 0 <= args.start < args.stop <= 17000:
    ap.error(f"--start {args.start} --stop {args.stop}: need 0 <= start < stop <= 17000 (17000.. are benchmark prompts)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lines = pathlib.Path(args.regen).read_text().splitlines()
  held = set(data.eval_indices(len(lines), data.DataConfig(eval_fraction=args.eval_fraction)).tolist())
  n_eval = len(held)
  (out / "eval.jsonl").write_text("".join(x + "\n" for i, x in enumerate(lines) if i in held))
  (out / "regen_train.jsonl").write_text("".join(x + "\n" for i, x in enumerate(lines) if i not in held))

  rows = sources.load_rows(sources.SHAREGPT)
  order = regenerate.row_order(len(rows), regenerate.RegenConfig(start=args.start, stop=args.stop))
  written = []
  for index in order:
    try:
      messages = [m for m in chat.normalize_conversation(rows[int(index)]) if m["role"] != "system"]
    except chat.MalformedRow:
      continue
    if (len(messages) < 2 or [m["role"] for m in messages[:2]] != ["user", "assistant"]
        or not all(m["content"].strip() for m in messages[:2]) or len(messages[0]["content"]) > args.max_prompt_chars):
      continue
    answer = messages[1]["content"]
    if len(answer) > args.max_answer_chars:
      answer = answer[:args.max_answer_chars].rsplit(" ", 1)[0]
    written.append(json.dumps({"index": int(index), "source": "sharegpt_original", "messages": [
        messages[0], {"role": "assistant", "content": answer}]}, ensure_ascii=False))
    if len(written) == args.rows:
      break
  if len(written) < args.rows:
    print(f"only {len(written)} usable ShareGPT rows in positions {args.start}..{args.stop} (asked for {args.rows})",
          file=sys.stderr)
  (out / "sharegpt_orig.jsonl").write_text("\n".join(written) + "\n")
  print(f"{out}: {len(lines) - n_eval} regenerated training rows, {n_eval} eval rows, {len(written)} ShareGPT rows")


if __name__ == "__main__":
  main()
