#!/usr/bin/env bash
# One accelerator lease for the default draft (scripts/gpu_pack.sh prepares what travels; BENCHMARKS.md "GPU burst"
# has a run): regenerate SmolLM2's answers to the next ShareGPT training prompts, then train a draft on them and on
# the committed CPU regenerations (data/), online, and pack the draft, the new rows and the logs for the trip back.
# Every stage is time-boxed so the lease returns something: regeneration keeps every chunk it finished, training
# stops on time (time_limit_s), evaluates and exports.
#
#   GGUF=... PROMPTS=... OUT=... REGEN_S=200 TRAIN_S=240 scripts/gpu_burst.sh [train.py key=value ...]
set -uo pipefail
cd "$(dirname "$0")/.."
: "${GGUF:?the SmolLM2 GGUF}" "${PROMPTS:?the prompts file (scripts/gpu_pack.sh)}" "${OUT:?where results go}"
REGEN_S=${REGEN_S:-200}; TRAIN_S=${TRAIN_S:-240}; BATCH=${BATCH:-256}; CHUNK=${CHUNK:-1024}
W=runs/gpu; mkdir -p $W
export PYTHONUNBUFFERED=1
t0=$(date +%s)
log() { echo "[burst +$(( $(date +%s) - t0 ))s] $*"; }

# Greedy answers only, static batches of one padded shape: every compilation of the 30-layer target costs the lease
# tens of seconds (a temperature or a length bucket would each add one), padding costs an accelerator little.
log "regeneration for ${REGEN_S}s: static batches of $BATCH, prompts padded to 768"
timeout -s TERM "$REGEN_S" python3 -m eagle3_jax.train.regenerate --source "$PROMPTS" --shuffle-seed -1 \
  --target "$GGUF" --output $W/regen.jsonl --first-turn-only --temperatures 0 --max-new-tokens 256 \
  --max-prompt-tokens 768 --prompt-bucket 768 --batch-size "$BATCH" --chunk-rows "$CHUNK" --batching static \
  --compile-cache none --no-progress 2>&1 | grep -v "^WARNING" | tail -n 20
log "regeneration ended (rc ${PIPESTATUS[0]}); $(cat $W/regen.jsonl.state.json 2>/dev/null | tr -d '\n ' | head -c 400)"

# Training rows: the committed CPU regenerations, then what this lease regenerated (its durable bytes only), less the
# 29 rows every default-draft run holds out (scripts/default_draft.sh).
python3 - "$W" <<'PY'
import gzip, json, pathlib, sys
sys.path.insert(0, ".")
from eagle3_jax.config import load_config
from eagle3_jax.train.data import eval_indices
w = pathlib.Path(sys.argv[1])
rows = lambda data: [line + b"\n" for line in data.split(b"\n") if line]  # not splitlines: text holds U+2028
lines = []
for snap in ("data/smollm2_regen.jsonl.gz", "data/smollm2_regen_c.jsonl.gz"):
  lines += rows(gzip.open(snap, "rb").read())
state = w / "regen.jsonl.state.json"
if state.is_file():
  lines += rows((w / "regen.jsonl").read_bytes()[:json.loads(state.read_text())["bytes"]])
held = set(eval_indices(586, load_config("configs/smollm2_135m.py").data).tolist())
(w / "train.jsonl").write_bytes(b"".join(l for i, l in enumerate(lines) if i not in held))
(w / "eval.jsonl").write_bytes(b"".join(lines[i] for i in sorted(held)))
print(f"{len(lines) - len(held)} training rows, {len(held)} held out", file=sys.stderr)
PY

log "training for ${TRAIN_S}s"
python3 train.py --config configs/smollm2_gpu.py target.path="$GGUF" time_limit_s="$TRAIN_S" progress=false "$@" \
  2>&1 | grep -v "^WARNING" | tail -n 40
log "training ended (rc ${PIPESTATUS[0]})"

# Back: one archive in parts under the transfer's 16 MiB file limit.
n=$(python3 -c "import json; print(json.load(open('$W/regen.jsonl.state.json'))['bytes'])" 2>/dev/null || echo 0)
head -c "$n" $W/regen.jsonl > $W/regen_durable.jsonl
cp $W/regen.jsonl.state.json $W/regen_durable.jsonl.state.json 2>/dev/null
tar czf $W/burst.tgz -C $W regen_durable.jsonl regen_durable.jsonl.state.json train/export train/metrics.jsonl \
  train/config.json 2>&1 | tail -n 3
split -b 15m -d $W/burst.tgz "$OUT/burst.tgz.part"
log "packed: $(ls -la "$OUT" | tail -n +2)"
