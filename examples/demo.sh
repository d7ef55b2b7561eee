#!/usr/bin/env bash
# The main job on the embedded default: the built-in corpus (multidomain preset, tiny size: eSpeak NG
# English in 4 domains), CSSL.1 then PTLOC.1 with the tiny model on CPU, then a table of each
# round's per-shard validation loss and equilibrium gap; then each round fine-tuned with CTC on a
# seen (read) and an unseen (meeting) domain and scored on their test sets (WER / CER).
#
#   bash examples/demo.sh [OUT]      (default OUT: runs/demo; a few minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/demo}
stage=${stage:-0}; stop_stage=${stop_stage:-3}
here=$(cd "$(dirname "$0")" && pwd)

if (( stage <= 0 && 0 <= stop_stage )); then
  echo "stage 0: corpus"
  eqssl-make-corpus "$out/corpus" --preset multidomain --size tiny  # resumes / verifies on a rerun
fi
if (( stage <= 1 && 1 <= stop_stage )); then
  echo "stage 1: CSSL.1 -> PTLOC.1"
  bash "$here/alternating_rounds.sh" "$out/corpus/pretrain" "$out" 1 tiny common.log_interval=50
fi
if (( stage <= 2 && 2 <= stop_stage )); then
  echo "stage 2: results"
  json=$out/results.json
  [ -e "$json" ] && json=$(mktemp -u "$out/results.XXXX.json")  # never overwrite an earlier table
  eqssl-gap "$out/corpus/pretrain" "CSSL.1=$out/cssl.1/checkpoint_best.pt" "PTLOC.1=$out/ptloc.1/checkpoint_best.pt" \
    --inner-steps 1 --inner-lr 1e-3 --json "$json"
  echo "(also written to $json)"
fi
if (( stage <= 3 && 3 <= stop_stage )); then
  echo "stage 3: fine-tuning and evaluation"
  python "$here/compare_checkpoints.py" "$out" \
    --checkpoints "CSSL.1=$out/cssl.1/checkpoint_best.pt" "PTLOC.1=$out/ptloc.1/checkpoint_best.pt" \
    --sets "read=$out/corpus/finetune/read" "meeting=$out/corpus/finetune/meeting" \
    --override optimization.max_update=150
fi
