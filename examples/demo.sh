#!/usr/bin/env bash
# The main job on the embedded default: the experiment of README "Results" at its tiny size, one
# seed and one round, with BEST-RQ (the paper's model), then a check of wav2vec 2.0's fairseq path.
#
#   bash examples/demo.sh [OUT]      (default OUT: runs/demo; about 8 minutes on 2 CPU cores)
#
# 1. eqssl-reproduce synthesises the built-in corpus (multidomain preset: eSpeak NG English in four
#    domains); pre-trains a tiny BEST-RQ with CSSL (CSSL.1) and again with half its budget (the
#    positive control); continues CSSL.1 with PTLOC (K=1, 3/4 of its length at the paper's beta
#    and alpha) and with the same run with the constraint off (its twin); adds the no-pre-training
#    control; measures every checkpoint's equilibrium gap; probes each with its encoder frozen (and
#    FBANK features, the floor) and fine-tunes each with CTC on a seen (read) and an unseen
#    (meeting) domain; prints whether CSSL.1 learned, where pre-training beats both floors, and the
#    tables (OUT/results.md).
# 2. wav2vec 2.0, the design card's model, through the same task and criterion: CSSL then PTLOC
#    for a few dozen updates, a check of the fairseq path that says what it is (in minutes on a
#    CPU wav2vec 2.0 stays on its early plateau, so it has no tables here).
#
# A rerun skips the finished stages. The full experiment: eqssl-reproduce --help.
set -euo pipefail
out=${1:-runs/demo}
# --jobs 2: two fairseq runs at a time, one thread each (faster here than one run on two threads):
# CSSL.1 beside its half-budget control, PTLOC beside its twin, probes beside the longest run
eqssl-reproduce --model bestrq --preset multidomain --size tiny --seeds 1 --jobs 2 --out "$out"
python "$(dirname "$0")/wav2vec2_path.py" "$out/wav2vec2" "$out/multidomain/corpus/pretrain"
