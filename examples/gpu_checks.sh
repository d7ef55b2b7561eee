#!/usr/bin/env bash
# The GPU checks of docs/scaling.md, one script for a session that is lent one GPU (about 9 minutes
# on an H200), run from the repository root:
#
#   bash examples/gpu_checks.sh OUT
#
# 1. The cost of one update (examples/benchmark_update_cost.py) of wav2vec 2.0 BASE and BEST-RQ
#    base, CSSL (K=0) against PTLOC (K=1), 3 shards, in fp32, fp16 (fairseq's loss scaler) and bf16.
# 2. One PTLOC run through fairseq's fp16 loss scaler on CUDA against the same run in fp32 and
#    bf16: tiny BEST-RQ on the toy corpus, CSSL for CSSL_UPDATES then PTLOC (the shipped recipe)
#    for PTLOC_UPDATES from it, the same seed; their validation losses side by side.
# Each part's tables go to OUT/*.md; fairseq's logs to OUT/*/train.log.
set -euo pipefail
mkdir -p "${1:?usage: bash examples/gpu_checks.sh OUT}"
out=$(cd "$1" && pwd)
cssl_updates=${CSSL_UPDATES:-300}
ptloc_updates=${PTLOC_UPDATES:-300}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -c "import eqssl, fairseq.options; print('fairseq', fairseq.__version__)"

for arch in eq_wav2vec2_base eq_bestrq_base; do
  for precision in fp32 fp16 bf16; do
    python examples/benchmark_update_cost.py --arch "$arch" --shards 3 --inner-steps 1 \
      --precision "$precision" --updates 10 --warmup 3 --workdir "$out/bench" | tee -a "$out/update_cost.md" \
      || echo "$arch $precision: failed" | tee -a "$out/update_cost.md"  # the other rows still run
    echo | tee -a "$out/update_cost.md"
  done
done

python -m eqssl.corpus.toy "$out/toy" --shards 3 --train-clips 48 --valid-clips 8
train() {  # NAME RECIPE [OVERRIDE ...]: one fairseq-hydra-train run on the GPU, log in OUT/NAME
  local name=$1 recipe=$2
  shift 2
  mkdir -p "$out/$name"
  python -m fairseq_cli.hydra_train --config-dir recipes/pretrain --config-name "$recipe" \
    task.data="$out/toy" checkpoint.save_dir="$out/$name" common.cpu=false \
    common.log_interval=50 "$@" > "$out/$name/train.log" 2>&1
}
train cssl cssl_bestrq_tiny optimization.max_update="$cssl_updates" \
  dataset.validate_interval_updates="$cssl_updates" checkpoint.save_interval_updates="$cssl_updates"
for precision in fp32 fp16 bf16; do
  flags=()
  [ "$precision" = fp32 ] || flags=("common.$precision=true")
  train "ptloc_$precision" ptloc_bestrq_tiny model.init_from="$out/cssl/checkpoint_last.pt" \
    optimization.max_update="$ptloc_updates" dataset.validate_interval_updates=100 \
    checkpoint.save_interval_updates="$ptloc_updates" "${flags[@]}"
done
python - "$out" <<'EOF' | tee "$out/precision.md"
import sys
from eqssl.experiment.fairseq_log import read_validations, trainings

out = sys.argv[1]
runs = {p: f"{out}/ptloc_{p}/train.log" for p in ("fp32", "fp16", "bf16")}
valid = {p: read_validations(path) for p, path in runs.items()}
print("PTLOC K=1 (tiny BEST-RQ, toy corpus) from the same CSSL checkpoint, validation loss (bits):")
print("| updates | " + " | ".join(runs) + " | fp16 - fp32 | bf16 - fp32 |")
print("|---|" + "---|" * (len(runs) + 2))
for i, row in enumerate(valid["fp32"]):
    cells = [valid[p][i]["loss"] if i < len(valid[p]) else float("nan") for p in runs]
    print(f"| {int(row['num_updates'])} | " + " | ".join(f"{c:.4f}" for c in cells)
          + f" | {cells[1] - cells[0]:+.4f} | {cells[2] - cells[0]:+.4f} |")
with open(runs["fp16"]) as f:
    scales = [t["loss_scale"] for t in trainings(f) if "loss_scale" in t]
print(f"\nfp16 loss scale at each training log line: {scales}")
EOF
