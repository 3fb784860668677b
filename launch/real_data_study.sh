#!/usr/bin/env bash
# The controlled real-data study of docs/real_data_study.md, at the `study` size
# (config_base.sized: 64x96, a quarter of the paper's widths) on ISIC 2016 (ISIC 2017 melanomas
# for mtl4). From the repository root:
#
#   bash launch/real_data_study.sh pilot [ROOT]   # mtl3, 20 epochs, the validation curve
#   bash launch/real_data_study.sh arms [ROOT]    # every arm at the study's epoch count
#   bash launch/real_data_study.sh more_seeds [ROOT]  # 3 more seeds of the leak's arms
#
# ROOT defaults to runs/real_data_study. DATA (default ../shared/data) holds the downloads;
# PYTHON picks the interpreter; EPOCHS overrides the arms' epoch count (default: the `study`
# size's num_epochs, chosen from the pilot). Each arm is one run of a 3-member seed ensemble
# (members seeded 0, 1, 2, each with its own data order: three independent seeds, trained in
# one program because that is cheaper on a CPU). The arms:
#
#   unet, mtl0, mtl3, mtl4 (leak-free), mtl4 under the paper's protocol (trained on the ISIC
#   2016 test melanomas that ISIC 2017 repeats), and mtl4's matched control (the paper
#   protocol's number of extra melanomas, so its steps and melanoma share, with each test image
#   replaced by a leak-free one): leak = paper - control, budget = control - leak-free.
#
# more_seeds trains members 3, 4, 5 of the matched control, the paper protocol and leak-free mtl4
# (one more 3-member run each, in seed3/ beside seed0/, under ROOT/arms): the leak's arms, where
# one seed of three collapsed to the prior. skinmtl_jax.study pools every seedN/ of an arm.
#
# The sweep skips finished runs and resumes unfinished ones, so the script can be run again
# after a stop. After each run its metrics.json, per-image CSVs and validation curve
# (scalars.jsonl's validation rows) are copied to docs/real_data_study/ (small files: what the
# page is generated from):
#
#   python -m skinmtl_jax.study docs/real_data_study --page=docs/real_data_study.md
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: real_data_study.sh pilot|arms|more_seeds [ROOT]}
ROOT=${2:-runs/real_data_study}
DATA=${DATA:-../shared/data}
PYTHON=${PYTHON:-python}
DOCS=${DOCS:-docs/real_data_study}
RUN_ARGS=(--config.data.manual_dir="$DATA" --config.num_seeds=3
          --config.seed_data_order=per_member)

collect() {  # copies the small result files of every finished run into $DOCS
  for m in $(cd "$ROOT" && find . -name metrics.json -not -path '*/eval_*' | sort); do
    dir=$(dirname "$m")
    mkdir -p "$DOCS/$dir"
    cp "$ROOT/$dir/metrics.json" "$ROOT/$dir"/per_image_*.csv "$DOCS/$dir/"
    grep '"validation/' "$ROOT/$dir/scalars.jsonl" > "$DOCS/$dir/validation_curve.jsonl" || true
  done
}

sweep() {  # sweep CONFIG [--set=...]; SEEDS (default 0): the first member's seed
  local config=$1; shift
  SECONDS=0
  "$PYTHON" launch/sweep.py --configs="$config" --seeds="${SEEDS:-0}" "$@" --root="$ROOT/${FOLDER:-$STAGE}" \
      --mode=local --python="$PYTHON" -- "${RUN_ARGS[@]}" ${EPOCHS:+--config.num_epochs=$EPOCHS}
  echo "real_data_study: $config $* done at $(date -u +%FT%TZ) after ${SECONDS} s"
  collect
}

case $STAGE in
  pilot)
    EPOCHS=${EPOCHS:-20}
    sweep configs/mtl3.py:study;;
  arms)
    # The leakage question's three arms first, then the ladder.
    sweep configs/mtl4.py:study
    sweep configs/mtl4.py:study --set=data.paper_protocol_train_on_test_images=True
    sweep configs/mtl4.py:study --set=data.paper_protocol_matched_control=True
    sweep configs/unet.py:study
    sweep configs/mtl3.py:study
    sweep configs/mtl0.py:study;;
  more_seeds)
    export SEEDS=3 FOLDER=arms
    sweep configs/mtl4.py:study --set=data.paper_protocol_matched_control=True
    sweep configs/mtl4.py:study --set=data.paper_protocol_train_on_test_images=True
    sweep configs/mtl4.py:study;;
  *) echo "real_data_study.sh: unknown stage $STAGE (pilot, arms or more_seeds)" >&2; exit 2;;
esac
