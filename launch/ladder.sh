#!/usr/bin/env bash
# Runs the paper's ablation ladder (Table 3) one config after another on this machine.
#
#   bash launch/ladder.sh RUNS_DIR [--config.field=value ...]
#
# Each config trains into RUNS_DIR/<config>/ and writes its metrics.json there; at the end
# RUNS_DIR/table3_isic2016.md and table4_ph2.md put every run beside the paper. Extra
# arguments go to every run (for example --config.data.manual_dir=/path/to/downloads).
# Re-running resumes each run from its latest checkpoint; finished runs only re-evaluate.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: bash launch/ladder.sh RUNS_DIR [--config.field=value ...]" >&2
  exit 2
fi
runs=$1
shift
cd "$(dirname "$0")/.."
names=$(python -m skinmtl_jax.tables --ladder)  # Table 3's rows, in its order (set -e stops here)
for name in $names; do
  echo "=== $name -> $runs/$name"
  python -m skinmtl_jax.main --config="configs/$name.py" --workdir="$runs/$name" "$@"
done
python -m skinmtl_jax.tables "$runs"
