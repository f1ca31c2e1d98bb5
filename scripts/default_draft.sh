#!/usr/bin/env bash
# The default draft's pipeline across sessions: regeneration, then training, each resumable, each in the
# background-friendly form (nice, a pid file, checkpoints). Rerun the same stage to continue it.
#
#   scripts/default_draft.sh regen                        # SmolLM2's answers to ShareGPT prompts (runs/regen/)
#   scripts/default_draft.sh regen-c                      # the same, positions 640 on, continuous batching (faster)
#   RUN=runs/smollm2_135m scripts/default_draft.sh train [key=value ...]   # dumps features, trains, exports
#
# Pause a running stage for a benchmark with `kill -STOP $(cat runs/<stage>.pid)` and `kill -CONT ...`.
# A machine without runs/: regeneration restarts from the committed snapshot of its output (data/), and a new
# training run warm-starts from the shipped draft (eagle3_jax/drafts/) instead of from random weights.
# A run is tied to the data it started on (its feature store and vocabulary are checked against it): after more
# regeneration, train a new RUN, which then starts from the shipped draft.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
stage=${1:?usage: scripts/default_draft.sh regen|train [args]}; shift
REGEN=runs/regen/sharegpt_t0.jsonl
SNAPSHOT=data/smollm2_regen.jsonl.gz
# The second file continues the same shuffled order where the first (static batches) stopped, with 32 continuous
# slots: 1.1-1.4x the tokens/s of static batches here. Its sampled rows depend on its batching, hence its own file.
REGEN_C=runs/regen/sharegpt_c.jsonl
SNAPSHOT_C=data/smollm2_regen_c.jsonl.gz
RUN=${RUN:-runs/smollm2_135m}
SHIPPED=eagle3_jax/drafts/smollm2_135m_instruct

restore_snapshot() {  # the committed regeneration outputs and their states, if runs/regen is gone
  local out snap
  for out_snap in "$REGEN:$SNAPSHOT" "$REGEN_C:$SNAPSHOT_C"; do
    out=${out_snap%%:*}; snap=${out_snap#*:}
    if [[ ! -f $out.state.json && -f $snap ]]; then
      mkdir -p runs/regen
      gunzip -c "$snap" > "$out"
      cp "${snap%.jsonl.gz}.state.json" "$out.state.json"
      echo "restored $out from $snap" >&2
    fi
  done
}

case $stage in
  regen)
    restore_snapshot
    echo $$ > runs/regen.pid
    # Killed at any moment (SIGTERM, the session's end), it resumes from its state file: nothing duplicated or lost.
    # Static batches: the snapshot was begun with them (a file keeps its batching; sampled rows depend on it).
    exec nice -n 5 python3 -m eagle3_jax.train.regenerate --source sharegpt --output "$REGEN" --stop 16000 \
         --first-turn-only --temperatures 0:0.8,1.0:0.2 --max-new-tokens 256 --max-prompt-tokens 768 \
         --batch-size 16 --chunk-rows 128 --compile-cache auto --batching static
    ;;
  regen-c)
    restore_snapshot
    echo $$ > runs/regen.pid
    exec nice -n 5 python3 -m eagle3_jax.train.regenerate --source sharegpt --output "$REGEN_C" --start 640 \
         --stop 16000 --first-turn-only --temperatures 0:0.8,1.0:0.2 --max-new-tokens 256 --max-prompt-tokens 768 \
         --batch-size 32 --chunk-rows 256 --compile-cache auto --batching continuous
    ;;
  snapshot)  # commit-ready copies of what regeneration has durably written (the state's byte count)
    for out_snap in "$REGEN:$SNAPSHOT" "$REGEN_C:$SNAPSHOT_C"; do
      out=${out_snap%%:*}; snap=${out_snap#*:}
      [[ -f $out.state.json ]] || continue
      cmp -s "$out.state.json" "${snap%.jsonl.gz}.state.json" && continue  # unchanged: keep the committed bytes
      bytes=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['bytes'])" "$out.state.json")
      head -c "$bytes" "$out" | gzip -9 > "$snap.tmp" && mv "$snap.tmp" "$snap"
      cp "$out.state.json" "${snap%.jsonl.gz}.state.json"
      echo "$snap: $(gunzip -c "$snap" | wc -l) rows" >&2
    done
    ;;
  train)
    restore_snapshot
    echo $$ > runs/train.pid
    extra=()
    # A new run (no checkpoint yet) starts from the shipped draft when there is one; the choice is recorded
    # so that resuming passes the same init_from (the run's vocabulary provenance depends on it).
    if [[ ! -f $RUN/init_from ]]; then
      mkdir -p $RUN
      if [[ ! -d $RUN/checkpoints && -f $SHIPPED/config.json ]]; then echo "$SHIPPED" > $RUN/init_from
      else : > $RUN/init_from; fi
    fi
    # The run trains on a frozen copy of what regeneration has durably written so far (the state's byte count),
    # so regeneration may go on beside it.
    if [[ ! -f $RUN/data.jsonl ]]; then
      [[ -f $REGEN.state.json ]] || { echo "no regenerated data ($REGEN): run '$0 regen' first" >&2; exit 2; }
      : > $RUN/data.jsonl.tmp
      for out in "$REGEN" "$REGEN_C"; do
        [[ -f $out.state.json ]] || continue
        bytes=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['bytes'])" "$out.state.json")
        head -c "$bytes" "$out" >> $RUN/data.jsonl.tmp
        cp "$out.state.json" "$RUN/$(basename "$out").state.json"  # how it was made, for the draft card
      done
      # Rows regenerated in accelerator leases (scripts/gpu_burst.sh), committed whole as data/smollm2_regen_gpu_*.
      for snap in data/smollm2_regen_gpu_*.jsonl.gz; do
        [[ -f $snap ]] && gunzip -c "$snap" >> $RUN/data.jsonl.tmp
      done
      mv $RUN/data.jsonl.tmp $RUN/data.jsonl
    fi
    # One held-out set for every run, so that warm starts never evaluate on rows an earlier run trained on: the
    # 29 rows that the config's 5% split holds out of the first 586 regenerated rows (run 1's data).
    if [[ ! -f $RUN/eval.jsonl ]]; then
      python3 - "$RUN" <<'PY'
import sys, pathlib, numpy as np
sys.path.insert(0, ".")
from eagle3_jax.config import load_config
from eagle3_jax.train.data import eval_indices
run = pathlib.Path(sys.argv[1])
# Split at b"\n" only: str.splitlines would also cut rows at the U+2028 some answers hold.
lines = [line + b"\n" for line in (run / "data.jsonl").read_bytes().split(b"\n") if line]
held = set(eval_indices(586, load_config("configs/smollm2_135m.py").data).tolist())
(run / "train.jsonl").write_bytes(b"".join(l for i, l in enumerate(lines) if i not in held))
(run / "eval.jsonl").write_bytes(b"".join(lines[i] for i in sorted(held)))
print(f"{run}: {len(lines) - len(held)} training rows, {len(held)} held out", file=sys.stderr)
PY
    fi
    init=$(cat $RUN/init_from)
    [[ -n $init ]] && extra+=("init_from=$init")
    exec nice -n 5 python3 train.py --config configs/smollm2_135m.py run_dir=$RUN feature_dir=$RUN/features \
      data.source=$RUN/train.jsonl data.eval_fraction=0 data.eval_source=$RUN/eval.jsonl \
      "${extra[@]}" "$@"
    ;;
  *) echo "unknown stage $stage (regen|train)" >&2; exit 2 ;;
esac
