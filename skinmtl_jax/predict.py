"""Second opinion on new images: lesion mask, overlay, melanoma probability, the decision, and
how sure it is.

    python -m skinmtl_jax.predict --workdir=RUN --out=DIR [--tta] [--dtype=bfloat16] IMAGE...

For each image (any size; JPEG, PNG, BMP, ...; 16-bit images scaled to 8 bits, EXIF
orientation applied; `--dtype=bfloat16` computes in bfloat16, faster on CPUs with AMX-BF16)
writes DIR/<name>_mask.png (the lesion mask at the image's own resolution, 0/255),
DIR/<name>_overlay.png (the image with the lesion outline, and where the opinions' masks
disagree tinted magenta), DIR/<name>_uncertainty.png (with several opinions: the entropy of the
averaged lesion probability per pixel, in bits, at the image's resolution, a colour bar on its
right), and one JSON line, printed and appended to DIR/predictions.jsonl, with:

- the melanoma probability and `decision`, taken at the operating point fitted on the
  validation split (`operating_point` names it; RUN/decision.json, see
  skinmtl_jax/uncertainty.py), else at the run's threshold; `decision_at_threshold` at the
  run's threshold (the paper's 0.5), the calibrated probability and its decision there (when
  RUN/calibration.json was fitted for the checkpoint; see skinmtl_jax/calibration.py);
- `review` (true or false) with `review_reasons` in words, and the reasons it could not check;
- `uncertainty`: the spread of the opinions (the members of a seed ensemble, each averaged
  over its views; one member's 8 views with --tta): melanoma_prob_std and _range,
  mutual_information (bits), votes_melanoma, mask_dice_between, mask_disagreement; null with
  `uncertainty_unavailable` when there is one opinion (one member, no --tta);
- the checkpoint used and the invocation (its time and process id, the same on every line of
  one command).

<name> is the file's name without its extension, made unique (see `output_names`), so two
inputs never share an output. `--tta` averages the predictions over the 8 flips and
right-angle rotations. An image that cannot be read is reported by name and the others are
still processed; the exit code is 1 if any failed.
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
from PIL import Image, ImageDraw

from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import checkpointing, saved_run, steps, uncertainty
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
  """The inverse of `_dihedral` on maps whose last two axes are (H, W)."""
  x = jnp.rot90(maps, -k, axes=(-2, -1))
  return x[..., ::-1] if flip else x


def make_predictor(model, state, tta: bool):
  """images (B, H, W, 3) uint8 -> the prediction: 'lesion_prob' (B, H, W) and 'melanoma_prob'
  (B,), where the model has them, averaged over the members of a seed ensemble and, when
  `tta`, over the 8 dihedral transforms (undone on the maps); 'opinions', the same per opinion
  (leading axis N): each member's prediction (averaged over its views) when there are several
  members, else each view's; 'opinions_are' ('members' or 'views') and 'members', 'views'.
  The spread of the opinions is what skinmtl_jax/uncertainty.py measures."""
  fn = jax.jit(functools.partial(steps.member_predictions, model=model))
  transforms = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
  members = jax.tree.leaves(state.params)[0].shape[0]

  def predict(images):
    views = []
    for k, f in transforms:
      o = fn(state, _dihedral(jnp.asarray(images), k, f))   # leaves (K, B, ...)
      if 'lesion_prob' in o:
        o = {**o, 'lesion_prob': _undo(o['lesion_prob'], k, f)}
      views.append(o)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *views)   # (V, K, B, ...)
    opinions = jax.tree.map(lambda x: x.mean(0) if members > 1 else x[:, 0], stacked)
    out = jax.device_get({**jax.tree.map(lambda x: x.mean(0), opinions), 'opinions': opinions})
    return {**out, 'opinions_are': 'members' if members > 1 else 'views', 'members': members,
            'views': len(transforms)}

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


def _resized(a: np.ndarray, width: int, height: int) -> np.ndarray:
  """A float map resized bilinearly to (height, width) (unchanged at its own size)."""
  if a.shape == (height, width):
    return np.asarray(a, np.float32)
  return np.asarray(Image.fromarray(np.asarray(a, np.float32), mode='F').resize(
      (width, height), Image.BILINEAR))


def uncertainty_png(path: str, entropy: np.ndarray) -> None:
  """Writes the map `entropy` (H, W) in bits as a colour image, pixel for pixel (its left H x W
  pixels), with a colour bar from 0 to 1 bit to its right."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  lut = (matplotlib.colormaps['magma'](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
  h, w = entropy.shape
  level = lambda e: np.clip(np.rint(np.asarray(e) * 255), 0, 255).astype(np.intp)
  canvas = np.full((max(h, 120), w + 64, 3), 255, np.uint8)
  canvas[:h, :w] = lut[level(entropy)]
  top, bottom = 8, canvas.shape[0] - 8
  bar = np.linspace(1, 0, bottom - top)[:, None].repeat(14, axis=1)
  canvas[top:bottom, w + 8:w + 22] = lut[level(bar)]
  image = Image.fromarray(canvas)
  draw = ImageDraw.Draw(image)
  for value, y in ((1, top), (0.5, (top + bottom) // 2 - 5), (0, bottom - 10)):
    draw.text((w + 25, y), f'{value:g}' + (' bit' if value == 1 else ''), fill=(0, 0, 0))
  image.save(path)


def _review_texts(reasons: dict, measures: dict, prob, decision: dict | None,
                  opinions: int, opinions_are: str) -> list[str]:
  """The reasons flagged for one image, in words with their values."""
  review_cfg = (decision or {}).get('review') or {}
  texts = []
  for reason in uncertainty.REASONS:
    if not (reason in reasons and bool(np.asarray(reasons[reason]).reshape(-1)[0])):
      continue
    if reason == 'decision_disagreement':
      texts.append(f'{opinions_are} disagree on the decision ({int(measures["votes_melanoma"])} '
                   f'of {opinions} say melanoma)')
    elif reason == 'mask_agreement':
      texts.append(f'mask agreement (mean Dice between {opinions_are}) '
                   f'{float(measures["mask_dice_between"]):.3f} below '
                   f'{review_cfg["mask_dice_min"]:.3f} (the validation split\'s lowest '
                   f'{100 * decision["review_share"]:g} %)')
    elif reason == 'near_threshold':
      lo, hi = review_cfg['near_threshold']
      texts.append(f'probability {prob:.3f} within the operating threshold\'s 95 % interval '
                   f'{lo:.3f}-{hi:.3f}')
    elif reason == 'lesion_at_border':
      texts.append('the lesion touches the image border')
    else:
      texts.append('no lesion found')
  return texts


def predict_file(path: str, out_dir: str, predict, size, threshold: float, checkpoint: str,
                 name: str | None = None, calibration: dict | None = None,
                 decision: dict | None = None) -> dict:
  """Runs the predictor on one image file, writes its mask, overlay and (with several
  opinions) uncertainty map as <name>_*.png, and returns its record (see the module's
  docstring). `threshold` is the run's (the masks', and the decision's without an operating
  point in `decision`, decision.json's content)."""
  with open(path, 'rb') as f:
    data = f.read()
  image = files.decode_image(data, path, mode='RGB')
  small = np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), np.uint8)
  out = predict(small[None])
  # A predictor of one opinion may give only the prediction.
  opinions = out.get('opinions') or {k: np.asarray(out[k])[None] for k in
                                      ('lesion_prob', 'melanoma_prob') if k in out}
  n = len(next(iter(opinions.values())))
  opinions_are = out.get('opinions_are', 'members')
  name = name or os.path.splitext(os.path.basename(path))[0]
  t, operating_point = uncertainty.decision_threshold(decision, threshold)
  record = {'image': path, 'name': name}
  measures, prob = {}, None
  if 'melanoma_prob' in out:
    prob = float(out['melanoma_prob'][0])
    record.update(melanoma_prob=prob, decision='melanoma' if prob >= t else 'benign',
                  operating_point=operating_point, decision_threshold=t)
    measures.update(uncertainty.melanoma_measures(opinions['melanoma_prob'], t))
  if 'lesion_prob' in out:
    measures.update(uncertainty.mask_measures(opinions['lesion_prob'], threshold))
  measures = {k: np.asarray(v) for k, v in measures.items()}
  reasons, unchecked = uncertainty.review(measures, None if prob is None else np.array([prob]),
                                          decision, n)
  texts = _review_texts(reasons, {k: v[0] for k, v in measures.items()}, prob, decision, n,
                        opinions_are)
  record['review'] = bool(texts)
  record['review_reasons'] = texts
  if unchecked:
    record['review_not_checked'] = [f'{r}: {why}' for r, why in unchecked.items()]
  if n > 1:
    record['uncertainty'] = {'opinions': n, 'opinions_are': opinions_are,
                             **{k: v[0].item() for k, v in measures.items()
                                if k not in ('lesion_empty', 'lesion_at_border')}}
  else:
    record['uncertainty'] = None
    record['uncertainty_unavailable'] = (
        'one opinion (one member, no --tta): no spread to measure; predict with --tta, or '
        'train a seed ensemble (--config.num_seeds=K)')
  if prob is not None:
    record['decision_at_threshold'] = 'melanoma' if prob >= threshold else 'benign'
    if calibration is not None:
      q = float(calibration_lib.apply(prob, calibration))
      record.update(melanoma_prob_calibrated=q,
                    decision_calibrated='melanoma' if q >= threshold else 'benign')
  record.update(threshold=threshold, width=image.width, height=image.height)
  if 'lesion_prob' in out:
    mean = _resized(out['lesion_prob'][0], image.width, image.height)
    full = mean >= threshold
    mask_path = os.path.join(out_dir, f'{name}_mask.png')
    Image.fromarray((full * 255).astype(np.uint8)).save(mask_path)
    rgb = np.array(image)
    if n > 1:  # where the opinions' masks disagree: some >= threshold, some below
      lesion = np.asarray(opinions['lesion_prob'])[:, 0]
      disagree = ((_resized(lesion.max(0), image.width, image.height) >= threshold)
                  & (_resized(lesion.min(0), image.width, image.height) < threshold))
      rgb[disagree] = (rgb[disagree] // 2 + np.array([127, 0, 127], np.uint8))
      map_path = os.path.join(out_dir, f'{name}_uncertainty.png')
      uncertainty_png(map_path, np.asarray(uncertainty.binary_entropy(mean)))
      record['uncertainty_map'] = map_path
    rgb[_outline(full, max(1, min(image.width, image.height) // 200))] = (0, 191, 255)
    overlay_path = os.path.join(out_dir, f'{name}_overlay.png')
    Image.fromarray(rgb).save(overlay_path)
    record.update(mask=mask_path, overlay=overlay_path, lesion_fraction=float(full.mean()))
  record.update(checkpoint=checkpoint, image_abspath=os.path.abspath(path))
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
    saved_run.check_run_dir(FLAGS.workdir)  # before --out is made: a wrong --workdir
    check_out_dir(FLAGS.out, FLAGS.workdir)     # leaves nothing behind
    config, model, state = saved_run.load_run(FLAGS.workdir, dtype=FLAGS.dtype or None)
    log = open(os.path.join(FLAGS.out, 'predictions.jsonl'), 'a', encoding='utf-8')  # pylint: disable=consider-using-with
  except (checkpointing.CheckpointError, ConfigError, OSError) as e:
    sys.exit(f'skinmtl_jax.predict: {e}')
  predict = make_predictor(model, state, FLAGS.tta)
  checkpoint = os.path.join(os.path.abspath(FLAGS.workdir), 'checkpoints',
                            str(steps.step_of(state)))
  fingerprint = steps.model_fingerprint(state)
  calibration = calibration_lib.load(FLAGS.workdir, steps.step_of(state), fingerprint,
                                     warn_missing=True)
  decision = uncertainty.load(FLAGS.workdir, steps.step_of(state), fingerprint,
                              warn_missing=True)
  dtype = config.model.dtype
  if calibration is not None and (FLAGS.tta or dtype != calibration.get('dtype', 'float32')):
    logging.warning('The calibration was fitted on single-view %s outputs; it is applied to '
                    '%s%s outputs here (recorded in each line as calibration_fitted_on).',
                    calibration.get('dtype', 'float32'), 'TTA-averaged ' if FLAGS.tta else '',
                    dtype)
  fitted_on = None
  if decision is not None:
    f = decision.get('fitted_on', {})
    fitted_on = (f'single-view {f.get("dtype", "float32")} outputs of {f.get("members", "?")} '
                 f'member(s) on the validation split ({f.get("images", "?")} images, '
                 f'{f.get("melanomas", "?")} melanomas)')
    if FLAGS.tta or dtype != f.get('dtype', 'float32'):
      logging.warning('The operating point and review thresholds were fitted on %s; they are '
                      'applied to %s%s outputs here (recorded in each line as '
                      'decision_fitted_on).', fitted_on, 'TTA-averaged ' if FLAGS.tta else '',
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
                              config.threshold, checkpoint, name, calibration, decision)
      except (files.DataError, OSError) as e:
        failed += 1
        print(f'skinmtl_jax.predict: {path}: {e}', file=sys.stderr)
        continue
      record['invocation'] = invocation
      record['compute_dtype'] = dtype
      record['tta'] = bool(FLAGS.tta)
      if fitted_on is not None:
        record['decision_fitted_on'] = fitted_on
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
