#!/usr/bin/env bash
# The main job on the embedded default: the experiment of README "Results" at its tiny size, one
# seed and one round. eqssl-reproduce synthesises the built-in corpus (multidomain preset: eSpeak
# NG English in four domains), pre-trains a tiny wav2vec 2.0 with CSSL for 200 updates (CSSL.1),
# continues it with PTLOC (K=1) and, as the compute-matched baseline, with CSSL for twice the
# updates; adds the no-pre-training control (random weights); measures every checkpoint's
# equilibrium gap; probes each with its encoder frozen (and FBANK features) and fine-tunes each
# with CTC on a seen (read) and an unseen (meeting) domain; and prints the validation accuracy
# against chance with a plain verdict (at this budget: still at chance), and the WER / CER tables.
#
#   bash examples/demo.sh [OUT]      (default OUT: runs/demo; a few minutes on 2 CPU cores)
#
# A rerun skips the finished stages. The full experiment: eqssl-reproduce --help.
set -euo pipefail
out=${1:-runs/demo}
eqssl-reproduce --preset multidomain --size tiny --seeds 1 --out "$out"
