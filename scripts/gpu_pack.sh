#!/usr/bin/env bash
# What an accelerator lease needs for scripts/gpu_burst.sh, in two loads under the lease's 64 MiB transfer limit
# (the target's GGUF alone is 98 MB): .dev/w1 = wheels the device image lacks or holds at other versions, the
# tokenizer cache and the GGUF's first half; .dev/w2 = its second half and the prompts (the next shuffled ShareGPT
# training positions, first turns only). The device keeps the first load in /tmp between the two calls.
#
#   scripts/gpu_pack.sh [START [STOP]]     # shuffled ShareGPT positions, default: where the CPU regeneration stopped
#
# Rows whose conversation an earlier lease answered (data/smollm2_regen_gpu_*.jsonl.gz, by ShareGPT id) are skipped;
# commit a lease's new rows under that name (gzip of runs/gpu/regen_durable.jsonl and its state file).
set -euo pipefail
cd "$(dirname "$0")/.."
START=${1:-$(python3 -c "import json; s=json.load(open('data/smollm2_regen_c.state.json')); print(s['config']['start'] + s['position'])")}
STOP=${2:-16000}
rm -rf .dev/w1 .dev/w2; mkdir -p .dev/w1/whl .dev/w2 .dev/wheels
for p in grain==0.2.18 array_record==0.8.6 gguf==0.19.0 tensorboardX==2.6.5 flax==0.12.8 optax==0.2.8 \
         orbax-checkpoint==0.12.8 portpicker==1.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .dev/wheels "$p" 2>&1 | grep -v WARNING || true
done
cp .dev/wheels/*.whl .dev/w1/whl/
G=$(python3 -c "from eagle3_jax.target import load; print(load.default_target_path())")
EAGLE3_JAX_CACHE=.dev/w1/cache python3 -c "from eagle3_jax.target import load; load.load_tokenizer('$G')"
python3 -c "import os; print(os.stat('$G').st_mtime_ns)" > .dev/w1/gguf_mtime_ns
cut=52000000  # the first load also carries ~11 MB of wheels and tokenizer; the second ~8 MB of prompts
head -c $cut "$G" > .dev/w1/gguf.part1
tail -c +$((cut + 1)) "$G" > .dev/w2/gguf.part2
sha256sum "$G" | cut -d' ' -f1 > .dev/w2/gguf.sha256
basename "$G" > .dev/w2/gguf.name
python3 - "$START" "$STOP" "$G" <<'PY'
import glob, gzip, json, sys
from eagle3_jax.config import RegenConfig
from eagle3_jax.target import load
from eagle3_jax.train import regenerate, sources
start, stop = int(sys.argv[1]), int(sys.argv[2])
tok = load.load_tokenizer(sys.argv[3])
rows = sources.load_rows(sources.SHAREGPT)
order = regenerate.row_order(len(rows), RegenConfig(source=sources.SHAREGPT, start=start, stop=stop))
# Conversations an earlier lease answered (committed as data/smollm2_regen_gpu_*) are not carried again.
done = set()
for snap in glob.glob("data/smollm2_regen_gpu_*.jsonl.gz"):
  done |= {json.loads(line).get("id") for line in gzip.open(snap, "rt")}
kept = 0
with gzip.open(".dev/w2/prompts.jsonl.gz", "wt") as f:
  for i in order:
    row = dict(rows[int(i)])
    if row.get("id") is not None and row.get("id") in done:
      continue
    turns = row.get("conversations")
    if isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns):
      # Conversations may open with an assistant turn, which regeneration drops: the first user turn is the prompt.
      u = next((j for j, t in enumerate(turns) if t.get("from") in ("human", "user")), 0)
      first = str(turns[u].get("value", ""))
      # A first prompt of more than --max-prompt-tokens tokens is skipped there anyway ("too_long"): not carried.
      if len(first) > 2000 and len(tok(first)["input_ids"]) > 768:
        continue
      row["conversations"] = [dict(t, value=str(t.get("value", ""))[:100]) if j else t for j, t in
                              enumerate(turns[u:u + 2])]  # first turns only: later ones are never read
    f.write(json.dumps(row) + "\n")
    kept += 1
print(f"prompts: shuffled ShareGPT positions {start}..{stop}: {len(order)} rows, {kept} carried", file=sys.stderr)
PY
du -sh .dev/w1 .dev/w2
