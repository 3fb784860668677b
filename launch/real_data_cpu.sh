#!/usr/bin/env bash
# The real-data study of docs/real_data_cpu.md: the ablation ladder at the CPU size on ISIC 2016
# (ISIC 2017 melanomas for mtl4), 3 seeds per rung, and mtl4 under the paper's protocol (its
# extra melanomas include ISIC 2016 test images). From the repository root:
#
#   bash launch/real_data_cpu.sh [ROOT]      # ROOT defaults to runs/real_data_cpu
#
# DATA (default ../shared/data) holds the downloads; PYTHON picks the interpreter. Each rung is
# one run of a 3-member seed ensemble (members seeded 0, 1, 2, each with its own data order:
# three independent seeds, trained in one program because that is cheaper on a CPU). The sweep
# skips finished runs and resumes unfinished ones, so the script can be run again after a stop.
# After each run, its metrics.json and per-image CSVs are copied to docs/real_data_cpu/ (small
# files: what the tables are generated from), and the tables are regenerated:
#
#   python -m skinmtl_jax.tables --seeds docs/real_data_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/real_data_cpu}
DATA=${DATA:-../shared/data}
PYTHON=${PYTHON:-python}
DOCS=docs/real_data_cpu
RUN_ARGS=(--config.data.manual_dir="$DATA" --config.num_seeds=3
          --config.seed_data_order=per_member)

collect() {  # copies the small result files of every finished run into $DOCS
  for m in $(cd "$ROOT" && find . -name metrics.json | sort); do
    dir=$(dirname "$m")
    mkdir -p "$DOCS/$dir"
    cp "$ROOT/$dir/metrics.json" "$ROOT/$dir"/per_image_*.csv "$DOCS/$dir/"
  done
}

# The most telling runs first: the baseline, the full method, and the leakage question.
for spec in "unet mtl3 mtl4" "mtl4 PAPER" "mtl0 mtl2"; do
  configs=() sets=()
  for name in $spec; do
    if [[ $name == PAPER ]]; then
      sets=(--set=data.paper_protocol_train_on_test_images=True)
    else
      configs+=("configs/$name.py:cpu")
    fi
  done
  for config in "${configs[@]}"; do
    SECONDS=0
    "$PYTHON" launch/sweep.py --configs="$config" --seeds=0 "${sets[@]}" --root="$ROOT" \
        --mode=local --python="$PYTHON" -- "${RUN_ARGS[@]}"
    echo "real_data_cpu: $config ${sets[*]} done at $(date -u +%FT%TZ) after ${SECONDS} s"
    collect
  done
done
"$PYTHON" -m skinmtl_jax.tables --seeds "$DOCS"
