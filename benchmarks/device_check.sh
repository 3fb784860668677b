#!/usr/bin/env bash
# The GPU check, in two calls of the device tool, each safe alone and each writing its files
# under $OUT as it goes (benchmarks/README.md gives both commands and their timeout_s):
#
#   bash benchmarks/device_check.sh table [--budget_s=215] [--size=full|tiny] [--continue]
#       [--fail_row=SPEC,...]
#     installs what the image lacks, prepares the data, then the throughput table
#     (throughput.md / throughput.json, rewritten after every row), rows in the order of the
#     goals; --continue keeps the rows that succeeded in this machine's last table (a warm
#     machine) and runs the rest;
#   bash benchmarks/device_check.sh train [--budget_s=245] [--size=full|tiny] [--seeds=8]
#       [--reserve_s=N]
#     the same set-up where a warm machine lacks it, then full-size leak-free mtl4 (bfloat16,
#     K seeds vmapped, shared data order) for as many steps as the measured speed and the
#     budget allow, evaluated on ISIC 2016 test and the PH2 fixture; prints the measured wall
#     time beside the extrapolated one of the paper's 50-epoch run (train_summary.json).
#
# --budget_s is the whole call's: every stage runs under `timeout` and the script ends inside
# it. --size=tiny is the same script on a CPU at 32x32 with tiny widths (the dry run).
# State kept for a second call on a warm machine lives in $DC_TMP (/tmp/device_check): the
# installed wheels, the prepared data, the import check and the last table's JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
what=${1:-}
shift || true
case $what in
  table) budget=215 ;;
  train) budget=245 ;;
  *) echo "usage: device_check.sh table|train [--budget_s=N] [--size=full|tiny] ... (see the" \
          "header)" >&2; exit 2 ;;
esac
size=full seeds=8 fail_row='' keep=0 reserve_s=
for arg in "$@"; do
  case $arg in
    --budget_s=*) budget=${arg#*=} ;;
    --size=*) size=${arg#*=} ;;
    --seeds=*) seeds=${arg#*=} ;;
    --fail_row=*) fail_row=${arg#*=} ;;
    --continue) keep=1 ;;
    --reserve_s=*) reserve_s=${arg#*=} ;;
    *) echo "device_check.sh: unknown argument $arg (see the header)" >&2; exit 2 ;;
  esac
done
left() { echo $(( budget - ($(date +%s) - start) )); }
OUT=${OUT:-/tmp/device_check_out}
DC=${DC_TMP:-/tmp/device_check}
carry=.device_check
mkdir -p "$OUT" "$DC"
exec > >(tee -a "$OUT/device_check.log") 2>&1
tee_pid=$!
exec 3>&1  # the stages' own lines reach the log even when a stage's output goes to a file
finish() {  # the last line, then let tee write it out before the tool collects $OUT
  echo "== $what done: $(( $(date +%s) - start )) s of a ${budget} s budget; exit $1;" \
       "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  exec >&- 2>&- 3>&-
  wait "$tee_pid" 2>/dev/null
  exit "$1"
}

# stage NAME SECONDS CMD...: CMD under `timeout` (TERM, then KILL 10 s later); its exit status.
stage() {
  local name=$1 secs=$2 t0 rc
  shift 2
  t0=$(date +%s)
  if (( secs < 5 )); then
    echo "== $name: not started, ${secs} s left" >&3
    return 124
  fi
  echo "== $name: up to ${secs} s, from $(( t0 - start )) s" >&3
  timeout -k 10 "$secs" "$@"
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s$( ((rc == 124)) && echo ' (timed out)')" >&3
  return $rc
}

echo "== device_check $what $(date -u +%FT%TZ) size=$size budget=${budget}s" \
     "$( [ "$what" = train ] && echo "seeds=$seeds")"
PY=${PYTHON:-python3}
# TF_CPP_MIN_LOG_LEVEL=1: XLA's and cuDNN's warnings stay in the log (the only post-mortem).
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
# No persistent compilation cache: the compile times are figures (and what the training call
# plans with), and a cached load would pass for a compile.
export JAX_ENABLE_COMPILATION_CACHE=false
[ -d "$DC/site" ] && export PYTHONPATH="$DC/site"${PYTHONPATH:+:$PYTHONPATH}
[ -d "$DC/site_orbax" ] && export PYTHONPATH="$DC/site_orbax:$PYTHONPATH"
export PYTHONPATH="$PWD"${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null

# 1. Install what the image lacks (wheels carried in .device_check/), unless importable already.
if ! $PY -c 'import grain, tensorflow_datasets, clu, ml_collections, array_record, openpyxl
import importlib.util, sys; sys.exit(importlib.util.find_spec("monai") is None)' 2>/dev/null; then
  stage install 120 $PY -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target "$DC/site" "$carry"/wheels/*.whl || finish 1
  export PYTHONPATH="$DC/site:$PYTHONPATH"
fi
if ! $PY -c 'import orbax.checkpoint as o, sys; sys.exit(int(o.__version__.split(".")[0]) >= 1)' \
    2>/dev/null; then  # missing, or 1.0+ (its API moved): the tested 0.12.8, ahead on the path
  stage install_orbax 60 $PY -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target "$DC/site_orbax" "$carry"/wheels_orbax/*.whl || finish 1
  export PYTHONPATH="$DC/site_orbax:$PYTHONPATH"
fi

# 2. Every import the two calls need, each tried alone: versions, devices and what failed
# (imports.json). Without torch or MONAI only the DynUNet row fails; anything else stops here.
# Once per machine: a later call on a warm machine copies the first call's imports.json.
if [ -f "$DC/imports.json" ]; then
  cp "$DC/imports.json" "$OUT/imports.json"
  echo "== imports: checked by an earlier call on this machine"
else
stage imports 90 $PY - "$OUT/imports.json" <<'PY' || finish 1
import importlib, json, sys
need = ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'numpy', 'scipy', 'PIL',
        'matplotlib', 'tensorboard', 'grain', 'array_record', 'clu', 'ml_collections',
        'openpyxl', 'tensorflow_datasets', 'skinmtl_jax.datasets.builders',
        'skinmtl_jax.input_pipeline', 'skinmtl_jax.train', 'skinmtl_jax.evaluate',
        'skinmtl_jax.report', 'skinmtl_jax.main', 'skinmtl_jax.prepare')
extra = ('torch', 'monai', 'monai.networks.nets', 'monai.losses')
out, failed = {}, []
for name in need + extra:
  try:
    m = importlib.import_module(name)
    out[name] = getattr(m, '__version__', 'ok')
  except Exception as e:  # pylint: disable=broad-except
    out[name] = f'FAILED {type(e).__name__}: {e}'
    failed.append(name)
try:  # tensorflow-datasets imports its parts lazily: the ones our builders touch
  import tensorflow_datasets as tfds
  for attr in ('core.DatasetBuilder', 'core.GeneratorBasedBuilder', 'core.BuilderConfig',
               'core.DatasetInfo', 'core.Version', 'features.FeaturesDict', 'features.Tensor',
               'features.ClassLabel', 'features.Text', 'download.DownloadConfig'):
    obj = tfds
    for part in attr.split('.'):
      obj = getattr(obj, part)
  # builder.as_data_source() reads the prepared files through this:
  importlib.import_module('tensorflow_datasets.core.data_sources.array_record')
except Exception as e:  # pylint: disable=broad-except
  out['tensorflow_datasets parts'] = f'FAILED {type(e).__name__}: {e}'
  failed.append('tensorflow_datasets parts')
try:  # what benchmarks/dynunet.py takes from MONAI
  from monai.networks.nets import DynUNet  # noqa: F401
  from monai.losses import DiceCELoss  # noqa: F401
except Exception as e:  # pylint: disable=broad-except
  out['monai parts'] = f'FAILED {type(e).__name__}: {e}'
  failed.append('monai parts')
import shutil
try:
  import jax
  out['devices'] = [str(d) for d in jax.devices()]
  out['device_kind'] = jax.devices()[0].device_kind
  if shutil.which('nvidia-smi') and jax.default_backend() != 'gpu':  # no CPU fallback
    out['devices'] = f'FAILED: JAX runs on {jax.default_backend()}, not the GPU'
    failed.append('devices')
  import torch
  out['torch_cuda'] = torch.cuda.is_available()
  out['torch_cudnn'] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
except Exception as e:  # pylint: disable=broad-except
  out['devices'] = f'FAILED {type(e).__name__}: {e}'
print(json.dumps(out, indent=1))
with open(sys.argv[1], 'w') as f:
  json.dump(out, f, indent=1)
fatal = [n for n in failed if n not in extra + ('monai parts',)]
if fatal:
  sys.exit(f'imports failed: {fatal}')
if failed:
  print(f'imports failed (the DynUNet row will fail): {failed}')
PY
cp "$OUT/imports.json" "$DC/imports.json"
fi

# 3. Prepare ISIC 2016, ISIC 2017 (its melanomas) and PH2 from the raw files, in parallel, once
# per machine (a marker says they are done).
if [ "$size" = tiny ]; then
  hw=32,32 px=32x32
  table_args=(--features=4,8,8,16 --batch=4 --steps=3 --warmup=1 --infer_runs=3 --matmul_n=512)
  train_args=("--config.model.features=(4,8,8,16)" --config.model.cls_hidden=8
              --config.eval_batch_size=5)
  batch=4
else
  hw=192,256 px=192x256 table_args=(--steps=50 --warmup=5) train_args=() batch=10
fi
data=$DC/tfds
if [ ! -f "$DC/prepared_$px" ]; then
  stage prepare 150 bash -c '
    py=$1 data=$2 px=$3 logs=$4 pids=() rc=0
    for ds in isic2016 isic2017 ph2; do
      "$py" -m skinmtl_jax.prepare --dataset=$ds --manual_dir=.device_check/data \
        --data_dir="$data" --size=$px > "$logs/prepare_$ds.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait $p || rc=1; done
    for ds in isic2016 isic2017 ph2; do
      if [ $rc = 0 ]; then grep -h "examples in" "$logs/prepare_$ds.log"
      else tail -n 15 "$logs/prepare_$ds.log"; fi
    done
    exit $rc' _ "$PY" "$data" "$px" "$DC" && touch "$DC/prepared_$px" || finish 1
fi

# 4a. The throughput table: the rows of the goals first (see throughput.py for the specs),
# each started only if its estimate fits what is left.
if [ "$what" = table ]; then
  rows=mtl4/bfloat16/1/resident,mtl4/bfloat16/8/resident/vmap,unet/bfloat16/1/constant,dynunet
  rows+=,mtl4/bfloat16/8/resident/unroll,matmul,mtl4/float32/1/resident
  rows+=,mtl4/bfloat16/1/resident/bf16bias,mtl4/bfloat16/1/constant,mtl4/bfloat16/1/streamed
  rows+=,mtl4/bfloat16/4/resident/vmap,mtl4/bfloat16/2/resident/vmap,unet/float32/1/constant
  rows+=,mtl4/float32/1/resident/highest,mtl4/bfloat16/1/convtranspose
  rows+=,mtl4/float32/8/resident/vmap
  extra=()
  [ $keep = 1 ] && extra+=(--keep="$DC/throughput.json")
  [ -n "$fail_row" ] && extra+=(--fail_row="$fail_row")
  lim=$(( $(left) - 15 ))  # TERM, then KILL 10 s later, inside the budget
  stage table $lim $PY benchmarks/throughput.py --rows=$rows --data=isic2016 \
    --manual_dir="$carry/data" --data_dir="$data" --image_size=$hw "${table_args[@]}" \
    --time_budget_s=$(( lim - 5 )) --json="$OUT/throughput.json" --md="$OUT/throughput.md" \
    "${extra[@]}"
  status=$?
  # The training call's measured speed, and --continue's rows, on a warm machine.
  [ -f "$OUT/throughput.json" ] && cp "$OUT/throughput.json" "$DC/throughput.json"
  finish $status
fi

# 4b. Training: steps/s of the same step (K members vmapped, data resident) from this
# machine's table if it has the row, else a short probe; then as many steps as fit.
run=$DC/run_mtl4
rm -rf "$run"  # never resume an earlier call's run
spec=mtl4/bfloat16/$seeds/resident/vmap
speed() {  # "STEPS_PER_S COMPILE_S" of row $spec in the JSON $1, or nothing
  $PY - "$1" "$spec" "$seeds" "$batch" <<'PY' 2>/dev/null
import json, sys
path, spec, k, b = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
row = next(r for r in json.load(open(path))['rows'] if r['spec'] == spec and r['status'] == 'ok')
print(f"{row['images_per_s'] / (k * b):.3f} {row['compile_s']:.1f}")
PY
}
measured=$( [ -f "$DC/throughput.json" ] && speed "$DC/throughput.json" )
source="this machine's table"
if [ -z "$measured" ]; then
  source='a probe'
  stage probe $(( $(left) / 2 )) $PY benchmarks/throughput.py --rows=$spec --data=isic2016 \
    --manual_dir="$carry/data" --data_dir="$data" --image_size=$hw "${table_args[@]}" \
    --steps=20 --infer_batches= --json="$OUT/train_probe.json" > "$DC/probe.log" 2>&1
  grep -E "^== row|^\| $spec" "$DC/probe.log"
  measured=$(speed "$OUT/train_probe.json")
fi
read -r sps compile_s <<< "${measured:-0 0}"
# Steps that fit: the time left less the run's fixed costs, by default 60 s + 4 compiles of the
# step as measured (start-up and data, the step's compile, the evaluation's two compiles (full
# and last batches) and its bootstrap, figures and files, margin: the dry runs' proportions on
# a loaded CPU, where they came to 100-160 s with 30 s compiles; train_summary.json gives the
# run's own) or --reserve_s; at 0.85 of the measured speed (the training loop logs, saves and
# feeds the step; a table row times the step alone); at most the paper's 50 epochs, at least
# 50 steps.
per_epoch=$(( 7364 / batch ))  # enlarged examples per epoch on the carried data (the log says)
read -r steps reserve <<< "$($PY -c "
left, sps, c, per_epoch, given = $(left), $sps, $compile_s, $per_epoch, ${reserve_s:-None}
reserve = given if given is not None else 60 + 4 * c
steps = int(max(0.0, left - reserve) * 0.85 * sps) if sps else 100
print(min(50 * per_epoch, max(50, steps)), round(reserve))")"
log_every=$(( steps / 8 > 10 ? steps / 8 : 10 ))
echo "== training mtl4 x $seeds seeds (vmapped, shared order): $steps steps" \
     "($($PY -c "print(round($steps / $per_epoch, 2))") epochs) at $sps steps/s from" \
     "$source; $reserve s kept for start-up, compile and evaluation; $(left) s left"
t0=$(date +%s)
stage mtl4 $(( $(left) - 25 )) $PY -m skinmtl_jax.main --config=configs/mtl4.py \
  --workdir="$run" --config.data.manual_dir="$carry/data" --config.data.data_dir="$data" \
  --config.data.image_size="($hw)" --config.num_seeds="$seeds" --config.model.dtype=bfloat16 \
  --config.member_loop=vmap --config.seed_data_order=shared --config.batch_size=$batch \
  --config.num_train_steps=$steps --config.log_every_steps=$log_every \
  --config.checkpoint_every_steps=1000000 "${train_args[@]}" > "$OUT/mtl4_train.log" 2>&1
status=$?
wall=$(( $(date +%s) - t0 ))
cp "$run/metrics.json" "$OUT/mtl4_metrics.json" 2>/dev/null
cp "$run/report.md" "$OUT/mtl4_report.md" 2>/dev/null
grep -E "after enlargement|Progress|isic2016_test|ph2|Error|error" "$OUT/mtl4_train.log" | tail -12

# 5. Measured against extrapolated: steady steps/s from the run's own progress lines.
stage summary 30 $PY - "$OUT" "$DC" "$wall" "$status" "$steps" "$seeds" "$batch" <<'PY'
import json, os, re, statistics, sys
out, dc, wall, status, steps, k, b = sys.argv[1:3] + [int(v) for v in sys.argv[3:]]
log = open(os.path.join(out, 'mtl4_train.log'), encoding='utf-8', errors='replace').read()
rates = [float(v) for v in re.findall(r'x ([0-9.]+) steps/s', log)]
m = re.search(r'(\d+) examples, (\d+) after enlargement', log)
per_epoch = (int(m.group(2)) if m else 7364) // b
steady = statistics.median(rates[1:] or rates) if rates else None
s = {'exit': status, 'seeds': k, 'batch': b, 'steps': steps, 'epochs': round(steps / per_epoch, 2),
     'wall_s': wall, 'steps_per_epoch': per_epoch, 'steady_steps_per_s': steady,
     'images_per_s': steady and steady * k * b}
if steady:
  train_s = steps / steady
  s['fixed_s'] = round(wall - train_s, 1)   # start-up, compile, evaluation, writing
  s['50_epochs_this_run_s'] = round(50 * per_epoch / steady + s['fixed_s'], 1)
  try:  # the paper's run is one member: its speed from this machine's table, if there
    rows = json.load(open(os.path.join(dc, 'throughput.json')))['rows']
    one = next(r for r in rows if r['spec'] == 'mtl4/bfloat16/1/resident' and r['status'] == 'ok')
    s['50_epochs_one_member_s'] = round(50 * per_epoch * b / one['images_per_s']
                                        + s['fixed_s'], 1)
  except Exception:  # pylint: disable=broad-except
    pass
try:
  metrics = json.load(open(os.path.join(out, 'mtl4_metrics.json')))
  s['train_loop_s'] = metrics.get('train_seconds_this_run')  # the loop, its compile included
  keys = ('dice', 'auc', 'f1_weighted', 'mcc', 'tnr', 'recall_melanoma')
  for name in ('isic2016_test', 'ph2'):
    r = metrics[name]
    s[name] = {'members_mean': {k: r.get(k) for k in keys},
               'ensemble': {k: r.get('ensemble', {}).get(k) for k in keys}}
except Exception:  # pylint: disable=broad-except
  s['metrics'] = 'none (the run did not finish its evaluation)'
print(json.dumps(s, indent=1))
json.dump(s, open(os.path.join(out, 'train_summary.json'), 'w'), indent=1)
if steady:
  print(f"measured: {wall} s for {steps} steps ({s['epochs']} epochs) x {k} members, "
        f"{steady:.2f} steps/s steady, {s['fixed_s']} s fixed; the paper's 50 epochs "
        f"({50 * per_epoch} steps) at this speed: {s['50_epochs_this_run_s']} s for {k} members"
        + (f", {s['50_epochs_one_member_s']} s for one (the table's one-member speed)"
           if '50_epochs_one_member_s' in s else ''))
PY
finish $status
