#!/usr/bin/env bash
# The default run at three seeds per setting, back to back, then the drift table (bench/bench_dtype.py):
#   llm_float32   --llm_dtype=float32                          (the reference)
#   llm_bfloat16  --llm_dtype=bfloat16                         (the model's forwards in bf16)
#   enc_bfloat16  --llm_dtype=bfloat16 --encoder_dtype=bfloat16 (and the training step's encoder product)
#
#   bash bench/bench_dtype.sh [root]       # run folders under root (default /tmp/ortho_sae_dtype)
#
# Each run goes through bench/bench_end_to_end.sh (wall time, peak RSS). Seeds interleave the settings, so
# machine drift hits all of them alike. The first bf16 run harvests its cache entry (cold harvest); set
# ORTHO_SAE_CACHE to an empty folder to time a fully cold first run. Hours on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/ortho_sae_dtype}
declare -A settings=(
  [llm_float32]="--llm_dtype=float32"
  [llm_bfloat16]="--llm_dtype=bfloat16"
  [enc_bfloat16]="--llm_dtype=bfloat16 --encoder_dtype=bfloat16"
)
for seed in 0 1 2; do
  for name in llm_float32 llm_bfloat16 enc_bfloat16; do
    out="$root/${name}_seed$seed"
    [ -f "$out/final_info.json" ] && continue  # a rerun picks up where it stopped
    echo "== $name seed $seed"
    # shellcheck disable=SC2086
    OUT_DIR="$out" bash bench/bench_end_to_end.sh --seed="$seed" ${settings[$name]} --wandb_mode=disabled
  done
done
echo "== the model's forwards in bf16 against fp32"
python -m bench.bench_dtype --base "$root"/llm_float32_seed* --other "$root"/llm_bfloat16_seed*
echo "== the encoder product in bf16 too, against bf16 forwards alone"
python -m bench.bench_dtype --base "$root"/llm_bfloat16_seed* --other "$root"/enc_bfloat16_seed*
