#!/usr/bin/env bash
# The paper's alternating rounds, CSSL.1 -> PTLOC.1 -> CSSL.2 -> PTLOC.2 -> ..., each round
# initialised from the previous round's best checkpoint (model.init_from), with the recipes
# recipes/pretrain/{cssl,ptloc}_SIZE.yaml.
#
#   bash examples/alternating_rounds.sh DATA OUT [ROUNDS] [SIZE] [hydra overrides...]
#   e.g. bash examples/alternating_rounds.sh /data/shards runs/paper 3 base optimization.max_update=100000
#
# Stage 2r-1 is CSSL.r and stage 2r is PTLOC.r; run a part with stage=/stop_stage= in the
# environment (icefall style). A round whose folder exists is resumed by fairseq from its
# checkpoint_last.pt (and so ends at once when it had finished).
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,12p' "$0"; exit 2; fi
data=$1; out=$2; rounds=${3:-2}; size=${4:-tiny}; shift $(( $# < 4 ? $# : 4 ))
stage=${stage:-1}; stop_stage=${stop_stage:-$(( 2 * rounds ))}
recipes="$(cd "$(dirname "$0")/.." && pwd)/recipes/pretrain"
user_dir=$(eqssl-user-dir)

previous=""
for (( s = 1; s <= 2 * rounds; s++ )); do
  round=$(( (s + 1) / 2 ))
  if (( s % 2 )); then method=cssl; else method=ptloc; fi
  name=${method}.${round}
  if (( s >= stage && s <= stop_stage )); then
    echo "stage $s: $name ($method, $size)${previous:+ from $previous}"
    init=()
    if [ -n "$previous" ]; then init=("++model.init_from=$previous"); fi
    fairseq-hydra-train --config-dir "$recipes" --config-name "${method}_${size}" \
      "task.data=$data" "checkpoint.save_dir=$out/$name" "common.user_dir=$user_dir" \
      "${init[@]}" "$@"
  fi
  previous=$out/$name/checkpoint_best.pt
done
