"""Second opinion on new images: lesion mask, overlay and melanoma probability.

    python -m skinmtl_jax.predict --workdir=RUN --out=DIR [--tta] [--dtype=bfloat16] IMAGE...

For each image (any size; JPEG, PNG, BMP, ...; 16-bit images scaled to 8 bits, EXIF
orientation applied; `--dtype=bfloat16` computes in bfloat16, faster on CPUs with AMX-BF16)
writes DIR/<name>_mask.png (the lesion mask at the image's own resolution,
0/255), DIR/<name>_overlay.png (the image with the lesion outline), and one JSON line, printed
and appended to DIR/predictions.jsonl, with the melanoma probability, the decision at the run's
threshold, the calibrated probability and its decision (when the run has a calibration fitted
for its checkpoint, RUN/calibration.json; see skinmtl_jax/calibration.py), the checkpoint used
and the invocation (its time and process id, the same on every line of one command). <name> is the
file's name without its extension, made unique (see `output_names`), so two inputs never share
an output. `--tta` averages the predictions over the 8 flips and right-angle rotations. An
image that cannot be read is reported by name and the others are still processed; the exit code
is 1 if any failed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import checkpointing, steps
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets import files

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run as a program, not on import)."""
  flags.DEFINE_string('workdir', None, 'Training run whose latest checkpoint is used.')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_bool('tta', False, 'Average over the 8 flips and right-angle rotations.')
  flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'],
                    'Compute dtype (default: the run\'s model.dtype). bfloat16 is faster on CPUs '
                    'with AMX-BF16 and on GPUs.')
  flags.mark_flags_as_required(['workdir', 'out'])


def _dihedral(images, k: int, flip: bool):
  x = images[:, :, ::-1] if flip else images
  return jnp.rot90(x, k, axes=(1, 2))


def _undo(maps, k: int, flip: bool):
  x = jnp.rot90(maps, -k, axes=(1, 2))
  return x[:, :, ::-1] if flip else x


def make_predictor(model, state, tta: bool):
  """images (N, H, W, 3) uint8 -> {'lesion_prob' (N, H, W), 'melanoma_prob' (N,)}, averaged
  over the members of a seed ensemble and, when `tta`, over the 8 dihedral transforms."""
  fn = jax.jit(functools.partial(steps.ensemble_predictions, model=model))
  transforms = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]

  def predict(images):
    outs = []
    for k, f in transforms:
      o = fn(state, _dihedral(jnp.asarray(images), k, f))
      if 'lesion_prob' in o:
        o = {**o, 'lesion_prob': _undo(o['lesion_prob'], k, f)}
      outs.append(o)
    return jax.device_get(jax.tree.map(lambda *xs: sum(xs) / len(xs), *outs))

  return predict


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
  inner = mask.copy()
  for _ in range(width):
    shrunk = inner.copy()
    shrunk[1:] &= inner[:-1]
    shrunk[:-1] &= inner[1:]
    shrunk[:, 1:] &= inner[:, :-1]
    shrunk[:, :-1] &= inner[:, 1:]
    inner = shrunk
  return mask & ~inner


def output_names(paths: list[str], out_dir: str) -> list[str]:
  """A distinct output name per input: the file name without its extension; where two inputs
  share it, the extension is added (`c_jpg`, `c_png`), then a number (`same_jpg_2`). The names
  that earlier invocations gave (out_dir/predictions.jsonl) stay with their images: an image
  predicted again keeps its name, and another image does not get it."""
  taken: dict[str, str] = {}  # name -> absolute path of the image it belongs to
  log = os.path.join(out_dir, 'predictions.jsonl')
  if os.path.exists(log):
    with open(log, encoding='utf-8') as f:
      for line in f:
        try:
          r = json.loads(line)
          taken[r['name']] = r['image_abspath']
        except (ValueError, KeyError, TypeError):
          continue  # a line from an older version, or cut off: names no output
  given = {path: name for name, path in taken.items()}  # an image predicted before keeps its name
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  names = []
  for p, stem in zip(paths, stems):
    mine = os.path.abspath(p)
    if mine in given:
      names.append(given[mine])
      continue
    ext = os.path.splitext(p)[1].lstrip('.').lower()
    others = [os.path.abspath(q) for q, t in zip(paths, stems) if t == stem]
    candidates = [stem] if len(set(others)) == 1 else []
    candidates += [f'{stem}_{ext}' if ext else stem]
    candidates += [f'{candidates[-1]}_{n}' for n in range(2, len(paths) + len(taken) + 3)]
    name = next(c for c in candidates if taken.get(c, mine) == mine)
    taken[name] = mine
    names.append(name)
  return names


def predict_file(path: str, out_dir: str, predict, size, threshold: float, checkpoint: str,
                 name: str | None = None, calibration: dict | None = None) -> dict:
  """Runs the predictor on one image file and writes its mask and overlay as <name>_*.png."""
  with open(path, 'rb') as f:
    data = f.read()
  image = files.decode_image(data, path, mode='RGB')
  small = np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), np.uint8)
  out = predict(small[None])
  name = name or os.path.splitext(os.path.basename(path))[0]
  record = {'image': path, 'image_abspath': os.path.abspath(path), 'name': name,
            'checkpoint': checkpoint, 'threshold': threshold,
            'width': image.width, 'height': image.height}
  if 'melanoma_prob' in out:
    p = float(out['melanoma_prob'][0])
    record.update(melanoma_prob=p, decision='melanoma' if p >= threshold else 'benign')
    if calibration is not None:
      q = float(calibration_lib.apply(p, calibration))
      record.update(melanoma_prob_calibrated=q,
                    decision_calibrated='melanoma' if q >= threshold else 'benign')
  if 'lesion_prob' in out:
    prob = Image.fromarray(np.asarray(out['lesion_prob'][0], np.float32), mode='F')
    full = np.asarray(prob.resize((image.width, image.height), Image.BILINEAR)) >= threshold
    mask_path = os.path.join(out_dir, f'{name}_mask.png')
    Image.fromarray((full * 255).astype(np.uint8)).save(mask_path)
    rgb = np.array(image)
    rgb[_outline(full, max(1, min(image.width, image.height) // 200))] = (0, 191, 255)
    overlay_path = os.path.join(out_dir, f'{name}_overlay.png')
    Image.fromarray(rgb).save(overlay_path)
    record.update(mask=mask_path, overlay=overlay_path, lesion_fraction=float(full.mean()))
  return record


def check_out_dir(out: str, workdir: str) -> None:
  """Makes --out, or says in one line why it cannot be: a file, not writable, or inside the
  run's checkpoints folder (which checkpoint rotation deletes)."""
  checkpoints = os.path.realpath(os.path.join(workdir, 'checkpoints'))
  real = os.path.realpath(out)
  if real == checkpoints or real.startswith(checkpoints + os.sep):
    raise ConfigError(f'--out={out} is inside {checkpoints}, which the run rotates (deleting old '
                      'checkpoints with what is in them): choose a folder outside it.')
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f'--out={out} is a file, not a folder: give a folder (it is made if '
                      'missing).')
  try:
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryFile(dir=out):
      pass
  except OSError as e:
    raise ConfigError(f'--out={out} cannot be written ({e.strerror or e}): give a folder you can '
                      'write to.') from e


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files.')
  checkpointing.quiet_orbax_logging()
  try:
    checkpointing.check_run_dir(FLAGS.workdir)  # before --out is made: a wrong --workdir
    check_out_dir(FLAGS.out, FLAGS.workdir)     # leaves nothing behind
    config, model, state = checkpointing.load_run(FLAGS.workdir, dtype=FLAGS.dtype or None)
    log = open(os.path.join(FLAGS.out, 'predictions.jsonl'), 'a', encoding='utf-8')  # pylint: disable=consider-using-with
  except (checkpointing.CheckpointError, ConfigError, OSError) as e:
    sys.exit(f'skinmtl_jax.predict: {e}')
  predict = make_predictor(model, state, FLAGS.tta)
  checkpoint = os.path.join(os.path.abspath(FLAGS.workdir), 'checkpoints',
                            str(checkpointing.step_of(state)))
  calibration = calibration_lib.load(FLAGS.workdir, checkpointing.step_of(state),
                                     steps.model_fingerprint(state), warn_missing=True)
  dtype = config.model.get('dtype', 'float32')
  if calibration is not None and (FLAGS.tta or dtype != calibration.get('dtype', 'float32')):
    logging.warning('The calibration was fitted on single-view %s outputs; it is applied to '
                    '%s%s outputs here (recorded in each line as calibration_fitted_on).',
                    calibration.get('dtype', 'float32'), 'TTA-averaged ' if FLAGS.tta else '',
                    dtype)
  invocation = f'{time.strftime("%Y-%m-%dT%H:%M:%S%z")} pid {os.getpid()}'
  failed, t0 = 0, time.time()
  with log:
    for i, (path, name) in enumerate(zip(paths, output_names(paths, FLAGS.out))):
      if i:
        logging.info('Predicted %d/%d images, %.2f images/s.', i, len(paths),
                     i / (time.time() - t0))
      try:
        record = predict_file(path, FLAGS.out, predict, tuple(config.data.image_size),
                              config.threshold, checkpoint, name, calibration)
      except (files.DataError, OSError) as e:
        failed += 1
        print(f'skinmtl_jax.predict: {path}: {e}', file=sys.stderr)
        continue
      record['invocation'] = invocation
      record['compute_dtype'] = dtype
      record['tta'] = bool(FLAGS.tta)
      if calibration is not None:
        record['calibration_fitted_on'] = (
            f'single-view {calibration.get("dtype", "float32")} outputs of the validation '
            f'split ({calibration.get("n", "?")} images)')
      line = json.dumps(record)
      print(line)
      log.write(line + '\n')
  logging.info('Predicted %d images in %.1f s, %.2f images/s.', len(paths), time.time() - t0,
               len(paths) / (time.time() - t0))
  if failed:
    print(f'skinmtl_jax.predict: {failed} of {len(paths)} images failed.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
