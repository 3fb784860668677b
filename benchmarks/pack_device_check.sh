#!/usr/bin/env bash
# Fills .device_check/ (git-ignored) with what benchmarks/device_check.sh needs on a GPU machine
# that has no package index and no ../shared: wheels and the raw data. Run here, from the
# repository root, then name .device_check in the device tool's `carry`. See benchmarks/README.md.
#
#   bash benchmarks/pack_device_check.sh [SHARED_DIR]     # default ../shared
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared}
dest=.device_check
rm -rf "$dest"
mkdir -p "$dest/wheels" "$dest/wheels_orbax" "$dest/data"

# 1. Wheels the GPU image lacks (Python 3.12): the prepared set, then pure-Python ones from PyPI.
cp "$shared"/device-wheels/*.whl "$dest/wheels/"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 -d "$dest/wheels" \
  monai==1.6.1 openpyxl==3.1.5 et-xmlfile==2.0.0 importlib_resources==6.5.2
# Installed there only if the image's orbax-checkpoint is 1.0 or newer (its API moved).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 -d "$dest/wheels_orbax" orbax-checkpoint==0.12.8

# 2. Raw data in the official layouts: ISIC 2016 whole, PH2's fixture whole, and of ISIC 2017
# only the melanomas (all that mtl4 takes from it) with their masks and label rows.
cp -r "$shared/data/isic2016" "$shared/data/ph2_fixture" "$dest/data/"
python3 - "$shared/data/isic2017" "$dest/data/isic2017" <<'PY'
import csv, os, shutil, sys
src, dst = sys.argv[1:]
for part in ('Training', 'Validation'):
  rows = list(csv.reader(open(f'{src}/ISIC-2017_{part}_Part3_GroundTruth.csv', newline='')))
  keep = [r for r in rows[1:] if float(r[1]) == 1.0]
  os.makedirs(f'{dst}/ISIC-2017_{part}_Data')
  os.makedirs(f'{dst}/ISIC-2017_{part}_Part1_GroundTruth')
  for r in keep:
    shutil.copy(f'{src}/ISIC-2017_{part}_Data/{r[0]}.jpg', f'{dst}/ISIC-2017_{part}_Data/')
    shutil.copy(f'{src}/ISIC-2017_{part}_Part1_GroundTruth/{r[0]}_segmentation.png',
                f'{dst}/ISIC-2017_{part}_Part1_GroundTruth/')
  with open(f'{dst}/ISIC-2017_{part}_Part3_GroundTruth.csv', 'w', newline='') as f:
    csv.writer(f).writerows([rows[0]] + keep)
  print(f'ISIC 2017 {part}: {len(keep)} melanomas of {len(rows) - 1}')
PY
du -sh "$dest" "$dest"/*
