#!/usr/bin/env bash
# Canonical EAGLE-3 against EAGLE 3.1 (fc_norm + norm_output) on the default draft's data: the same rows, feature
# store, vocabulary, seed, steps and tokens, both from random weights, so the head variant is the only difference.
# Needs a default-draft run whose feature dump has finished (FEATURES_RUN, default runs/smollm2_r5).
#
#   scripts/compare_variants.sh [key=value ...]      # runs/cmp_canonical, then runs/cmp_eagle31
#
# Each run resumes from its checkpoints when rerun; the pid file is runs/compare.pid (pause with kill -STOP).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FEATURES_RUN:-runs/smollm2_r5}
[[ -f $SRC/features/index.json && -f $SRC/train.jsonl ]] || { echo "no finished feature store in $SRC" >&2; exit 2; }
echo $$ > runs/compare.pid
# Short runs: R = 1 first (the fastest way to acc_0, pilot), then R = 3, which is as deep as this CPU serves.
common=(run_dir=RUN feature_dir=$SRC/features data.source=$SRC/train.jsonl data.eval_fraction=0
        data.eval_source=$SRC/eval.jsonl num_steps=250 ttt.schedule=0:1,150:3 optim.warmup_steps=20
        eval_every=125 checkpoint_every=125 export_every=0 "$@")
for variant in canonical eagle31; do
  flags=()
  [[ $variant == eagle31 ]] && flags=(draft.fc_norm=true draft.norm_output=true)
  nice -n 5 python3 train.py --config configs/smollm2_135m.py "${common[@]/RUN/runs/cmp_$variant}" "${flags[@]}"
done
