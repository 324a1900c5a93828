#!/usr/bin/env bash
# The default run on a GPU at both model dtypes, with wall time and peak memory: run it whenever a GPU
# machine is lent, and record the result in BENCHMARKS.md beside the CPU numbers. Never part of CI.
#
#   bash bench/gpu_check.sh [root]        # run folders under root (default /tmp/ortho_sae_gpu)
#
# --device=cuda picks the CUDA defaults (4M training tokens, F = 32·d); the unlearning evaluation and
# core eval run as on the CPU. Prints each run's wall time, training's share of it and the headline
# numbers (one seed each: compare them with the CPU's seed spread in BENCHMARKS.md, not with each other).
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/ortho_sae_gpu}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'bf16:', torch.cuda.is_bf16_supported())"
for dtype in float32 bfloat16; do
  out="$root/llm_$dtype"
  start=$(date +%s)
  python experiment.py --device=cuda --llm_dtype="$dtype" --out_dir="$out" --overwrite --wandb_mode=disabled
  echo "llm_dtype=$dtype: $(( $(date +%s) - start )) s wall"
  python - "$out" <<'PY'
import json, sys
import results
info = json.load(open(f"{sys.argv[1]}/final_info.json"))
flat = results.flatten(info)
train_s = results.training_section(info)["final_info"]["train_wall_time_s"]
print({k: flat[k] for k in ("val_ev", "conv_ev", "ce_loss_score", "held_out_score", "held_out_score_se")},
      f"training {train_s:.0f} s of {info['provenance']['wall_time_s']:.0f} s")
PY
done
