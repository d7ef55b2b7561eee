#!/usr/bin/env bash
# The main job on the embedded default: the experiment of README "Results" at its tiny size, one
# seed and one round, for both model families. eqssl-reproduce synthesises the built-in corpus
# (multidomain preset: eSpeak NG English in four domains), pre-trains a tiny wav2vec 2.0 with CSSL
# for 200 updates (CSSL.1), continues it with PTLOC (K=1) and, as the compute-matched baseline,
# with CSSL for twice the updates; adds the no-pre-training control (random weights); measures
# every checkpoint's equilibrium gap; probes each with its encoder frozen (and FBANK features)
# and fine-tunes each with CTC on a seen (read) and an unseen (meeting) domain; and prints the
# validation accuracy against chance with a plain verdict, and the WER / CER tables. Then the
# same with BEST-RQ (the paper's model, --model bestrq) on the same corpus, in OUT/bestrq.
#
#   bash examples/demo.sh [OUT]      (default OUT: runs/demo; a few minutes on 2 CPU cores)
#
# A rerun skips the finished stages. The full experiment: eqssl-reproduce --help.
set -euo pipefail
out=${1:-runs/demo}
eqssl-reproduce --preset multidomain --size tiny --seeds 1 --out "$out"
# BEST-RQ reads the corpus built above (eqssl-reproduce verifies it and builds nothing)
mkdir -p "$out/bestrq/multidomain"
[ -e "$out/bestrq/multidomain/corpus" ] || ln -s "$(cd "$out/multidomain/corpus" && pwd)" "$out/bestrq/multidomain/corpus"
eqssl-reproduce --model bestrq --preset multidomain --size tiny --seeds 1 --out "$out/bestrq"
