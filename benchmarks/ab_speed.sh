#!/usr/bin/env bash
# Same-speed check between two commits, interleaved in one run (old, new, old, new): bench_vanilla twice each, then
# the in-loop section of bench_spec once each. Each side runs its own code (its worktree on PYTHONPATH).
#
#   git worktree add --detach /tmp/old OLD_COMMIT && benchmarks/ab_speed.sh /tmp/old . /tmp/ab
set -u
OLD=$(realpath "${1:?old worktree}"); NEW=$(realpath "${2:?new worktree}"); out=${3:-/tmp/ab}; mkdir -p "$out"
run() {  # side dir name args...
  local side=$1 dir=$2 name=$3; shift 3
  ( cd "$dir" && PYTHONPATH="$dir" python "$@" > "$out/${name}_${side}.log" 2>&1
    tail -1 "$out/${name}_${side}.log" > "$out/${name}_${side}.json" )
  echo "$(date +%T) done $name $side"
}
V="benchmarks/bench_vanilla.py --no-hf --max-new-tokens 64 --repeats 2 --batch-sizes 1,4"
S="benchmarks/bench_spec.py --skip e2e,costs,floor --draft eagle3_jax/drafts/smollm2_135m_instruct --trees 1x1x1,2x3x6 --batch-sizes 1,4"
run old "$OLD" vanilla1 $V
run new "$NEW" vanilla1 $V
run old "$OLD" vanilla2 $V
run new "$NEW" vanilla2 $V
run old "$OLD" spec $S
run new "$NEW" spec $S
