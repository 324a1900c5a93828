#!/usr/bin/env bash
# The default run end to end, warm: wall time and peak memory (RSS) of `python experiment.py` under /usr/bin/time -v.
#
#   bash bench/bench_end_to_end.sh                      # default run (adaptive_ortho), out_dir /tmp/ortho_sae_e2e
#   bash bench/bench_end_to_end.sh --variant=topk       # any experiment.py options are passed through
#
# Warm: the model conversion and the activation cache are reused from the cache folder ($ORTHO_SAE_CACHE or
# ~/.cache/orthogonal_sae); run it twice, or once after any default run, to time the warm case. For the cold case
# point ORTHO_SAE_CACHE at an empty folder. The target (issue 6) is a peak RSS under 6 GB.
# Needs GNU time (Debian package `time`). Run from the repository root with the venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/time ]; then
  echo "/usr/bin/time not found: apt-get install time" >&2
  exit 1
fi
out_dir=${OUT_DIR:-/tmp/ortho_sae_e2e}
log=$(mktemp)
/usr/bin/time -v -o "$log" python experiment.py --out_dir="$out_dir" --overwrite "$@"
wall=$(grep "Elapsed (wall clock) time" "$log" | awk '{print $NF}')
rss_kb=$(grep "Maximum resident set size" "$log" | awk '{print $NF}')
echo
echo "| run | wall time (h:mm:ss or m:ss) | peak RSS |"
echo "|---|---:|---:|"
echo "| python experiment.py $* (threads: torch default, $(nproc) cores) | $wall | $(awk -v kb="$rss_kb" 'BEGIN {printf "%.2f GB", kb / 1e6}') |"
rm -f "$log"
