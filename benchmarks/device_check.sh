#!/usr/bin/env bash
# The GPU check, in one command: install, prepare the data, the throughput table, then a
# full-size leak-free mtl4 seed ensemble for as many of the paper's 50 epochs as the budget
# allows, evaluated on ISIC 2016 test and the PH2 fixture. Every figure goes under $OUT.
# benchmarks/README.md says how to pack what it needs (.device_check/) and how to run it.
#
#   bash benchmarks/device_check.sh [--budget_s=510] [--size=full|tiny] [--seeds=4]
#
# --size=tiny is the same script on a CPU at 32x32 with tiny widths (the dry run).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=510 size=full seeds=4
for arg in "$@"; do
  case $arg in
    --budget_s=*) budget=${arg#*=} ;;
    --size=*) size=${arg#*=} ;;
    --seeds=*) seeds=${arg#*=} ;;
    *) echo "device_check.sh: unknown argument $arg (see the header)" >&2; exit 2 ;;
  esac
done
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
OUT=${OUT:-/tmp/device_check_out}
mkdir -p "$OUT"
carry=.device_check
log="$OUT/device_check.log"
exec > >(tee -a "$log") 2>&1
echo "== device_check $(date -u +%FT%TZ) size=$size budget=${budget}s seeds=$seeds"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

# 1. Install what the image lacks (wheels carried in .device_check/), unless importable already.
if ! $PY -c 'import grain, tensorflow_datasets, clu, ml_collections, array_record, openpyxl' \
    2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$carry"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c 'import orbax.checkpoint as o, sys; sys.exit(int(o.__version__.split(".")[0]) >= 1)' \
    2>/dev/null; then  # missing, or 1.0+ (its API moved): the tested 0.12.8
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$carry"/wheels_orbax/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
$PY - <<'PY' || exit 1
import importlib, json, jax
mods = ('flax', 'optax', 'orbax.checkpoint', 'grain', 'tensorflow_datasets', 'clu', 'numpy')
versions = {m: getattr(importlib.import_module(m), '__version__', '?') for m in mods}
print(json.dumps({'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()], **versions}))
PY

# 2. Prepare ISIC 2016, ISIC 2017 (its melanomas) and PH2 from the raw files.
if [ "$size" = tiny ]; then
  hw=32,32 px=32x32 model=(--features=4,8,8,16 --batch=4 --steps=3 --warmup=1 --infer_runs=3)
  train_model=("--config.model.features=(4,8,8,16)" --config.model.cls_hidden=8
               --config.batch_size=4 --config.eval_batch_size=5 --config.num_train_steps=20)
else
  hw=192,256 px=192x256 model=(--peak_tflops=990) train_model=()
fi
data=/tmp/skinmtl_tfds
for ds in isic2016 isic2017 ph2; do
  $PY -m skinmtl_jax.prepare --dataset=$ds --manual_dir="$carry/data" --data_dir=$data \
    --size=$px || exit 1
done
echo "== prepared in $(( $(date +%s) - start )) s"

# 3. The throughput table: budgeted so that the training run keeps at least 45 % of the time.
rows=mtl4/bfloat16/1/constant,mtl4/bfloat16/1/resident,mtl4/bfloat16/1/streamed
rows+=,mtl4/bfloat16/2/constant,mtl4/bfloat16/4/constant,mtl4/bfloat16/8/constant
rows+=,mtl4/float32/1/constant,mtl4/float32/8/constant,unet/bfloat16/1/constant
rows+=,unet/float32/1/constant,mtl4/bfloat16/1/convtranspose,mtl4/bfloat16/8/resident
table_budget=$(( $(left) * 45 / 100 ))
$PY benchmarks/throughput.py --rows=$rows --data=isic2016 --manual_dir="$carry/data" \
  --data_dir=$data --image_size=$hw "${model[@]}" --monai --time_budget_s=$table_budget \
  --json="$OUT/throughput.json" | tee "$OUT/throughput.md"
echo "== throughput table done at $(( $(date +%s) - start )) s"

# 4. mtl4, leak-free, K seeds in one vmapped run (bfloat16), epochs from the measured speed.
run=/tmp/skinmtl_mtl4
epochs=$($PY - "$OUT/throughput.json" "$(left)" "$seeds" <<'PY'
import json, sys
path, left, k = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rows = json.load(open(path))['training']
# Images/s of mtl4 bf16 with data on the device, at the K nearest this run's.
cands = [r for r in rows if r['model'] == 'mtl4' and r['dtype'] == 'bfloat16'
         and r['input'] in ('resident', 'constant')]
best = min(cands, key=lambda r: (abs(r['members'] - k), r['input'] != 'resident'), default=None)
per_member = best['images_per_s_per_member'] if best else 0.0
per_epoch = 7364  # enlarged examples per epoch on the carried data (the dry run's log says)
seconds = max(left - 150.0, 0.0)  # start-up, compile and the evaluation
print(max(1, min(50, int(seconds * per_member / per_epoch))) if per_member else 1)
PY
)
[ "$size" = tiny ] && epochs=1
echo "== training mtl4 x $seeds seeds for $epochs epoch(s); $(left) s of the budget left"
t0=$(date +%s)
$PY -m skinmtl_jax.main --config=configs/mtl4.py --workdir=$run \
  --config.data.manual_dir="$carry/data" --config.data.data_dir=$data \
  --config.data.image_size="($hw)" --config.num_seeds="$seeds" --config.model.dtype=bfloat16 \
  --config.num_epochs="$epochs" --config.log_every_steps=100 \
  --config.checkpoint_every_steps=100000 "${train_model[@]}" > "$OUT/mtl4_train.log" 2>&1
status=$?
echo "== mtl4: exit $status, $(( $(date +%s) - t0 )) s wall for $epochs epoch(s) x $seeds seeds"
grep -E "after enlargement|steps_per_sec|isic2016_test:|ph2:|Error|error" "$OUT/mtl4_train.log" \
  | tail -8
cp $run/metrics.json "$OUT/mtl4_metrics.json" 2>/dev/null
cp $run/report.md "$OUT/mtl4_report.md" 2>/dev/null
echo "== done in $(( $(date +%s) - start )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
