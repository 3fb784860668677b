"""`evaluate`, `predict` and the ladder table on a tiny trained run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from skinmtl_jax import tables

ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run')
  r = subprocess.run([sys.executable, '-m', 'skinmtl_jax.main', '--config=configs/tiny.py',
                      f'--workdir={workdir}', '--config.model.attention_pool=True'],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)


def test_evaluate_writes_every_artifact(tiny_run):
  for name in ('report.md', 'per_image_test.csv', 'boxplot_test.png', 'overlays_test.png',
               'roc_test.png'):
    os.remove(tiny_run / name)
  r = _run('skinmtl_jax.evaluate', f'--workdir={tiny_run}')
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tiny_run / 'metrics.json').read_text())
  t = m['test']
  for k in ('dice', 'iou', 'mcc', 'f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'ap',
            'confusion', 'n', 'ci95', 'dice_pooled', 'recall_melanoma'):
    assert k in t, k
  assert t['ci95']['dice'][0] <= t['dice'] <= t['ci95']['dice'][1]
  report = (tiny_run / 'report.md').read_text()
  assert '| tiny (ours) |' in report and '95 % bootstrap' in report
  rows = (tiny_run / 'per_image_test.csv').read_text().splitlines()
  assert rows[0] == 'id,label,melanoma_prob,dice,iou,mcc' and len(rows) == 13
  for png in ('boxplot_test.png', 'overlays_test.png', 'roc_test.png'):
    with Image.open(tiny_run / png) as im:
      assert im.size[0] > 200 and im.size[1] > 200


def test_report_puts_the_papers_row_beside_ours():
  from skinmtl_jax import evaluate
  r = {'n': 379, 'confusion': [[250, 54], [20, 55]], 'tpr_weighted': 0.8, 'tnr': 0.82,
       'f1_weighted': 0.81, 'mcc': 0.85, 'iou': 0.82, 'dice': 0.89, 'ci95': {}}
  text = evaluate.report_section('isic2016_test', r, 'mtl4', 10_891_770)
  assert '| mtl4 (paper) | 10.90 | B | 248 (81.58%) | 56 (18.42%) | 80.74 | 81.58 | 82.07 |' in text
  assert '| mtl4 (ours) | 10.89 | B | 250 (82.24%) | 54 (17.76%) | 80.00 | 82.00 | 81.00 |' in text


def test_predict_keeps_each_images_size_and_survives_a_corrupt_file(tiny_run, tmp_path,
                                                                    shared_data):
  bmp = shared_data / 'ph2_fixture' / 'PH2Dataset' / 'PH2 Dataset images'
  images = [bmp / 'IMD002' / 'IMD002_Dermoscopic_Image' / 'IMD002.bmp',
            bmp / 'IMD058' / 'IMD058_Dermoscopic_Image' / 'IMD058.bmp',
            shared_data / 'isic2016' / 'ISBI2016_ISIC_Part1_Test_Data' / 'ISIC_0000013.jpg']
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(images[2].read_bytes()[:300])
  png = tmp_path / 'odd size.png'
  Image.new('RGB', (123, 77), (180, 120, 100)).save(png)
  out = tmp_path / 'out'
  r = _run('skinmtl_jax.predict', f'--workdir={tiny_run}', f'--out={out}', '--tta',
           str(images[0]), str(bad), str(images[1]), str(images[2]), str(png))
  assert r.returncode == 1                                  # one failed
  assert 'broken.jpg' in r.stderr and '1 of 5 images failed' in r.stderr
  lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
  assert len(lines) == 4
  for rec, src in zip(lines, [images[0], images[1], images[2], png]):
    with Image.open(src) as im, Image.open(rec['mask']) as mask:
      assert mask.size == im.size
      assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert 0.0 <= rec['melanoma_prob'] <= 1.0 and rec['decision'] in ('benign', 'melanoma')
    assert rec['checkpoint'].endswith(os.path.join('checkpoints', '6'))
    assert os.path.exists(rec['overlay'])


def test_ladder_table_assembles_runs(tmp_path):
  run = tmp_path / 'mtl4'
  run.mkdir()
  (run / 'metrics.json').write_text(json.dumps({'params': 10_891_770, 'isic2016_test': {
      'confusion': [[250, 54], [20, 55]], 'tpr_weighted': 0.8, 'tnr': 0.82, 'f1_weighted': 0.81,
      'mcc': 0.85, 'iou': 0.82, 'dice': 0.89, 'auc': 0.9}}))
  text = tables.table(str(tmp_path), 'isic2016_test')
  assert '| mtl4 | ours | 10.89 | [[250, 54], [20, 55]] | 80.00 | 82.00 | 81.00 | 85.00 | 82.00 | 89.00 | 90.00 |' in text
  assert '| mtl4 | paper | 10.90 | [[248, 56], [17, 58]] | 80.74 | 81.58 | 82.07 |' in text
  assert '| unet | paper | 10.71 |' in text and '| unet | ours' not in text
