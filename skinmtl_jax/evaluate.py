"""Evaluation: measures, `metrics.json`, `report.md`, per-image CSVs and figures.

    python -m skinmtl_jax.evaluate --workdir=RUN [--datasets=isic2016_test,ph2]
        [--dtype=bfloat16 [--out=DIR]]

evaluates the latest checkpoint of RUN (also run at the end of training) and writes into RUN:
metrics.json; report.md (our rows in the layout of the paper's Tables 3-4, the paper's row
beside them, and the calibration of the melanoma probability); per_image_<set>.csv;
boxplot_<set>.png (per-image MCC, IoU, DSC, the paper's Figure 6); overlays_<set>.png (best and
worst cases, the paper's Figures 5 and 7); roc_<set>.png; reliability_<set>.png (the
reliability diagram before and after calibration); calibration.json (the temperature and bias
fitted on the validation split, see skinmtl_jax/calibration.py); decision.json (the operating
point and the review flag's thresholds, see skinmtl_jax/uncertainty.py); and the figures as
images in the run's TensorBoard files. The measures are made here (`evaluate`, which writes
nothing), the files by skinmtl_jax/report.py (`report.write`; the TensorBoard images by
skinmtl_jax/writers.py); `evaluate_and_report` runs the one, then the other.

`--dtype` evaluates in another compute dtype than the run trained with (`model.dtype`: a
float32 run in bfloat16, say, to see what bfloat16 inference costs). The run's own files are
then left alone: everything is written into --out (default RUN/eval_<dtype>), its
metrics.json with 'compute_dtype'.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np

from skinmtl_jax import calibration as calibration_lib
from skinmtl_jax import workdir as workdir_lib
from skinmtl_jax import checkpointing, input_pipeline, metrics, report, saved_run, splits, steps
from skinmtl_jax import uncertainty, writers
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.files import DataError

SEG_KEYS = ('dice', 'iou', 'mcc')
CLS_KEYS = ('f1_weighted', 'tpr_weighted', 'tnr', 'auc', 'ap', 'confusion')
CI_KEYS = ('dice', 'iou', 'mcc', 'f1_weighted', 'tpr_weighted', 'tnr', 'auc')


HEADLINE = ('dice', 'iou', 'mcc', 'dice_pooled', 'iou_pooled', 'mcc_pooled', 'f1_weighted',
            'tpr_weighted', 'tnr', 'recall_melanoma', 'recall_benign', 'auc', 'ap', 'ece',
            'brier')
# What calibration changes: its own measures and the decisions at the threshold.
CALIBRATED_KEYS = ('ece', 'brier', 'tpr_weighted', 'tnr', 'f1_weighted', 'recall_melanoma',
                   'recall_benign', 'confusion')


def scores(labels: np.ndarray, counts: np.ndarray | None, probs: np.ndarray | None, *,
           threshold: float, bootstrap_samples: int = 1000) -> tuple[dict, dict]:
  """Measures of one model on one set, from per-image seg counts (N, 4) and melanoma
  probabilities (N,) (either may be None). Returns (result, per_image)."""
  result: dict[str, Any] = {k: None for k in SEG_KEYS + CLS_KEYS}
  per_image: dict[str, Any] = {'label': labels.tolist()}
  stats = {}
  if counts is not None:
    seg = metrics.segmentation_scores(counts)
    per = seg.pop('per_image')
    per_image.update({k: v.tolist() for k, v in per.items()})
    result.update(seg)
    stats.update({k: functools.partial(lambda a, idx: float(np.mean(a[idx])), per[k])
                  for k in SEG_KEYS})
  if probs is not None:
    p = np.asarray(probs, np.float64)
    result.update(metrics.classification_scores(labels, p, threshold))
    result['ap'] = metrics.average_precision(labels, p)
    result['ece'] = metrics.expected_calibration_error(labels, p)
    result['brier'] = metrics.brier_score(labels, p)
    per_image['melanoma_prob'] = p.tolist()

    def cls_stat(key, idx):
      if key == 'auc':
        return metrics.roc_auc(labels[idx], p[idx])
      cm = metrics.confusion_matrix(labels[idx], (p[idx] >= threshold).astype(int))
      value = metrics.classification_scores_from_confusion(cm)[key]
      return float('nan') if value is None else value  # a resample without the class
    stats.update({k: functools.partial(cls_stat, k) for k in ('f1_weighted', 'tpr_weighted',
                                                              'tnr', 'auc')})
  if bootstrap_samples:
    result['ci95'] = {k: list(metrics.bootstrap_ci(stats[k], len(labels),
                                                   num_samples=bootstrap_samples))
                      for k in CI_KEYS if k in stats}
  result['n'] = len(labels)
  return result, per_image


def aggregate_members(members: list[dict]) -> dict[str, Any]:
  """Mean, standard deviation (ddof 1) and the 95 % t-interval of the mean across members, for
  every headline number; the mean confusion matrix. Keys of the mean stay at the top level."""
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  k = len(members)
  out: dict[str, Any] = {'std': {}, 'ci95_across_members': {}}
  for key in HEADLINE:
    vals = [m[key] for m in members if m.get(key) is not None]
    if len(vals) != k:
      out[key] = None
      continue
    v = np.asarray(vals, np.float64)
    mean, std = float(v.mean()), float(v.std(ddof=1)) if k > 1 else 0.0
    half = float(sps.t.ppf(0.975, k - 1) * std / np.sqrt(k)) if k > 1 else 0.0
    out[key] = mean
    out['std'][key] = std
    # Every headline measure lies in [0, 1] (MCC in [-1, 1]): so does its interval.
    lo = -1.0 if key.startswith('mcc') else 0.0
    out['ci95_across_members'][key] = [max(lo, mean - half), min(1.0, mean + half)]
  cms = [m['confusion'] for m in members if m.get('confusion') is not None]
  out['confusion'] = np.mean(cms, axis=0).tolist() if len(cms) == k else None
  return out


def evaluation_step(state, batch: dict[str, Any], *, model, threshold: float = 0.5
                    ) -> dict[str, Any]:
  """`steps.eval_step`'s outputs and, under 'uncertainty', the members' mask measures per image
  (uncertainty.mask_measures at `threshold`). Jitted as one program, the members' forward pass
  runs once: XLA merges the two identical ones (tests/test_uncertainty.py counts them)."""
  out = steps.eval_step(state, batch, model=model, threshold=threshold)
  members = steps.member_predictions(state, batch['image'], model=model)
  if 'lesion_prob' in members:
    out['uncertainty'] = uncertainty.mask_measures(members['lesion_prob'], threshold)
  return out


def evaluate_split(eval_step, state, split: splits.Split, *, batch_size: int,
                   threshold: float, bootstrap_samples: int = 1000) -> dict[str, Any]:
  """Runs the jitted `eval_step` over every example of `split` once.

  With one member, returns its measures ('ci95' by bootstrap over images). With K > 1, the
  top-level measures are the members' means, with 'std', 'ci95_across_members', 'members'
  (each member's measures) and 'ensemble' (the measures of the members' averaged
  probabilities). 'per_image' (of the single model or the ensemble) is for the report, with
  the mask measures of `evaluation_step`'s 'uncertainty', if it gives them.
  """
  outs, ids = [], []
  total, t0 = len(split.source), time.time()
  last_log = t0
  for batch, batch_ids in input_pipeline.eval_batches(split, batch_size):
    valid = batch.pop('valid')
    out = jax.device_get(eval_step(state, batch))
    per_image_measures = out.pop('uncertainty', {})
    outs.append({k: (v[:, valid] if not k.startswith('ensemble') else v[valid])
                 for k, v in out.items()})
    outs[-1]['uncertainty'] = {k: v[valid] for k, v in per_image_measures.items()}
    ids += batch_ids
    if time.time() - last_log > 10 and len(ids) < total:
      last_log = time.time()
      logging.info('Evaluating %s: %d/%d images, %.1f images/s.', split.name, len(ids), total,
                   len(ids) / (last_log - t0))
  seconds = time.time() - t0
  logging.info('Evaluated %s: %d images in %.1f s, %.1f images/s.', split.name, len(ids),
               seconds, len(ids) / max(seconds, 1e-9))
  measures = {k: np.concatenate([o['uncertainty'][k] for o in outs])
              for k in outs[0]['uncertainty']}
  cat = {k: np.concatenate([o[k] for o in outs], axis=0 if k.startswith('ensemble') else 1)
         for k in outs[0] if k != 'uncertainty'}
  labels = np.asarray(split.labels)
  num = (cat.get('seg_counts') if 'seg_counts' in cat else cat['melanoma_prob']).shape[0]
  member_arrays = lambda i: (cat['seg_counts'][i] if 'seg_counts' in cat else None,
                             cat['melanoma_prob'][i] if 'melanoma_prob' in cat else None)
  if num == 1:
    result, per_image = scores(labels, *member_arrays(0), threshold=threshold,
                               bootstrap_samples=bootstrap_samples)
  else:
    members = [scores(labels, *member_arrays(i), threshold=threshold, bootstrap_samples=0)[0]
               for i in range(num)]
    ensemble, per_image = scores(labels, cat.get('ensemble_seg_counts'),
                                 cat.get('ensemble_melanoma_prob'), threshold=threshold,
                                 bootstrap_samples=bootstrap_samples)
    result = {**aggregate_members(members), 'n': len(ids), 'members': members,
              'ensemble': ensemble}
    # Each member's probabilities and Dice too: paired comparisons of seeds, per-seed measures.
    if 'melanoma_prob' in cat:
      per_image.update({f'melanoma_prob_member{i}': cat['melanoma_prob'][i].tolist()
                        for i in range(num)})
    if 'seg_counts' in cat:
      per_image.update({f'dice_member{i}': metrics.segmentation_scores(
          cat['seg_counts'][i])['per_image']['dice'].tolist() for i in range(num)})
  per_image.update({k: (v.astype(int) if v.dtype == bool else v).tolist()
                    for k, v in measures.items()})
  per_image['id'] = ids
  result['per_image'] = per_image
  return result


def calibrated_scores(labels, probs, calibration: dict[str, Any], *,
                      threshold: float) -> dict[str, Any]:
  """ECE, Brier and the decision measures at `threshold` of the calibrated probabilities."""
  labels = np.asarray(labels)
  q = calibration_lib.apply(probs, calibration)
  out = {k: v for k, v in metrics.classification_scores(labels, q, threshold).items()
         if k in CALIBRATED_KEYS}
  out['ece'] = metrics.expected_calibration_error(labels, q)
  out['brier'] = metrics.brier_score(labels, q)
  return out


def fit_calibration(eval_step, state, validation: splits.Split, *,
                    batch_size: int) -> tuple[dict[str, Any] | None, dict[str, list]]:
  """Platt scaling of the melanoma probability (of the single model, or the ensemble's
  average, what `predict` gives) on the validation split (None without a classifier), and the
  split's per-image outputs (per_image_validation.csv: what a threshold chosen on the
  validation split is chosen from)."""
  r = evaluate_split(eval_step, state, validation, batch_size=batch_size, threshold=0.5,
                     bootstrap_samples=0)
  probs = r['per_image'].get('melanoma_prob')
  if probs is None:
    return None, r['per_image']
  fitted = calibration_lib.fit(validation.labels, probs)
  if fitted is not None:
    logging.info('Calibration on %s (%d images, %d melanomas): temperature %.3f, bias %.3f; '
                 'NLL %.4f -> %.4f.', validation.name, fitted['n'], fitted['melanomas'],
                 fitted['temperature'], fitted['bias'], fitted['nll_before'],
                 fitted['nll_after'])
  return fitted, r['per_image']


def evaluate(state, model, splits: dict[str, splits.Split], results: dict[str, Any], *,
             dtype: str, decision_cfg: uncertainty.DecisionConfig, threshold: float,
             batch_size: int, calibration_dir: str,
             validation: splits.Split | None = None) -> report.Evaluation:
  """Measures `state` on each split (by eval set name); writes nothing (report.write does).

  The run's settings: `dtype` (the compute dtype, config.model.dtype unless overridden),
  `decision_cfg` (config.decision, read once), `threshold` and `batch_size`
  (config.threshold, config.eval_batch_size).

  `results` holds what is known already (params, steps, data provenance); the evaluation
  entries are added to it (metrics.json's content). With a `validation` split, the calibration
  of the melanoma probability is fitted on it first ('calibration'; without one, the
  calibration.json fitted earlier for this checkpoint in `calibration_dir`, if any, is used)
  and each set's entry (the ensemble's, for K > 1) gets 'calibrated': the same measures of the
  calibrated probabilities. The operating point and the review flag's thresholds are fitted on
  it too ('decision'; skinmtl_jax/uncertainty.py; loaded like the calibration without one),
  and every set's entry gets 'operating_point' (its decisions there) and 'review' (whether the
  flag finds the errors; the validation split's, in-sample, under 'validation').

  Returns:
    report.Evaluation: `results` and, per set, what the report draws beyond it (per-image
    columns, the review's per-image errors and scores, the calibrated probabilities).
  """
  eval_step = jax.jit(functools.partial(evaluation_step, model=model, threshold=threshold))
  step = steps.step_of(state)
  fingerprint = steps.model_fingerprint(state)
  fitted_now = validation is not None and len(validation.source) > 0
  if fitted_now:
    calibration, per_image = fit_calibration(eval_step, state, validation,
                                             batch_size=batch_size)
    if calibration is not None:  # what it was fitted on: single views, this compute dtype
      calibration['dtype'] = dtype
    decision = uncertainty.fit_decision(validation.labels, per_image, decision_cfg,
                                        calibration=calibration)
    decision['fitted_on']['dtype'] = dtype
  else:
    # Fitted earlier for this checkpoint's model, if at all.
    calibration = calibration_lib.load(calibration_dir, step, fingerprint)
    decision = uncertainty.load(calibration_dir, step, fingerprint)
  results['calibration'] = calibration
  results['decision'] = decision
  validation_outputs = None
  if fitted_now:  # after 'calibration' and 'decision': metrics.json keeps their order
    labels = validation.labels
    review = _review(labels, per_image, decision, threshold, decision_cfg)
    results['validation'] = {'n': len(labels), 'review': _without_per_image(review),
                             'operating_point': uncertainty.at_operating_point(
                                 labels, per_image.get('melanoma_prob'), decision)}
    validation_outputs = report.SetOutputs(validation, per_image, review)
  sets = {}
  for name, split in splits.items():
    r = evaluate_split(eval_step, state, split, batch_size=batch_size,
                       threshold=threshold)
    per_image = r.pop('per_image')
    results[name] = r
    # The calibration is of what predict gives: the single model, or the ensemble's average.
    target = r.get('ensemble', r)
    calibrated = None
    if calibration is not None and 'melanoma_prob' in per_image:
      calibrated = calibration_lib.apply(per_image['melanoma_prob'], calibration)
      target['calibrated'] = calibrated_scores(split.labels, per_image['melanoma_prob'],
                                               calibration, threshold=threshold)
    op = uncertainty.at_operating_point(split.labels, per_image.get('melanoma_prob'), decision)
    if op is not None:
      target['operating_point'] = op
    review = _review(split.labels, per_image, decision, threshold, decision_cfg)
    target['review'] = _without_per_image(review)
    sets[name] = report.SetOutputs(split, per_image, review, calibrated)
  return report.Evaluation(results, validation_outputs, sets, step, fingerprint)


def _review(labels, per_image: dict[str, list], decision, threshold: float,
            decision_cfg) -> dict:
  """uncertainty.assess on one set; its per-image columns are added to `per_image` (for the
  CSV)."""
  review = uncertainty.assess(labels, per_image, decision, fallback_threshold=threshold,
                              seg_error_dice=decision_cfg.seg_error_dice)
  per_image.update(review['per_image']['columns'])
  return review


def _without_per_image(review: dict) -> dict:
  """The review's summary, as metrics.json holds it (its per-image part is for the figure)."""
  return {k: v for k, v in review.items() if k != 'per_image'}


def evaluate_and_report(state, model, workdir: str, splits: dict[str, splits.Split],
                        results: dict[str, Any], *, experiment: str, model_cfg,
                        decision_cfg: uncertainty.DecisionConfig, threshold: float,
                        batch_size: int, write: bool = True,
                        validation: splits.Split | None = None,
                        calibration_dir: str | None = None) -> dict[str, Any]:
  """`evaluate`, then `report.write` into `workdir`: what training and the command line run.

  `experiment` (the config's name, in headings) and `model_cfg` (config.model: its arch and
  compute dtype) are the run's; the other arguments are `evaluate`'s. Without a `validation`
  split, the calibration and decision fitted earlier are read from `calibration_dir`, by
  default `workdir`. With `write=False` (processes other than the first of a multi-host run)
  nothing is written. Returns metrics.json's content.
  """
  evaluation = evaluate(state, model, splits, results, dtype=model_cfg.dtype,
                        decision_cfg=decision_cfg, threshold=threshold, batch_size=batch_size,
                        calibration_dir=calibration_dir or workdir, validation=validation)
  if write:
    predict_jit = jax.jit(functools.partial(steps.ensemble_predictions, model=model))
    report.write(workdir, evaluation, lambda images: jax.device_get(predict_jit(state, images)),
                 experiment=experiment, arch=model_cfg.arch, threshold=threshold,
                 seg_error_dice=decision_cfg.seg_error_dice)
  return evaluation.results


# ---------------------------------------------------------------------------- command line

def main(argv):
  del argv
  checkpointing.quiet_orbax_logging()
  f = flags.FLAGS
  try:
    out = _out_dir(f, saved_run.check_run_dir(f.workdir).model.dtype)
    if os.path.realpath(out) == os.path.realpath(f.workdir):
      # metrics.json and the report are the run's: not while it trains or is evaluated
      # elsewhere.
      with workdir_lib.lock(f.workdir):
        _evaluate(f, out)
    else:  # writes only into --out: a read-only run will do
      _evaluate(f, out)
  except (checkpointing.CheckpointError, ConfigError, DataError, OSError) as e:
    sys.exit(f'skinmtl_jax.evaluate: {e}')


def _out_dir(f, trained: str) -> str:
  """Where evaluate writes: --out, else the run (RUN/eval_<dtype> in another dtype than the
  `trained` one)."""
  dtype = f.dtype or trained
  return f.out or (f.workdir if dtype == trained else os.path.join(f.workdir, f'eval_{dtype}'))


def _evaluate(f, out: str):
  trained = saved_run.check_run_dir(f.workdir).model.dtype
  dtype = f.dtype or trained
  config, model, state = saved_run.load_run(f.workdir, dtype=dtype)
  names = f.datasets or list(config.data.eval_sets)
  known = ['test'] if config.data.name == 'synthetic' else sorted(input_pipeline.EVAL_SETS)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ConfigError(f'--datasets names {", ".join(map(repr, unknown))}; this run\'s data '
                      f'({config.data.name}) has the evaluation sets {", ".join(known)}.')
  splits = {n: input_pipeline.get_split(config.data, n) for n in names}
  try:
    validation = input_pipeline.validation_split(config.data)
  except (ConfigError, DataError) as e:  # e.g. evaluated where only the test sets are
    logging.warning('The validation split cannot be read (%s): the calibration is not fitted '
                    'again; the calibration.json of this checkpoint, if any, is used.', e)
    validation = None
  in_run = os.path.realpath(out) == os.path.realpath(f.workdir)
  results = {}
  for path in dict.fromkeys([os.path.join(out, 'metrics.json'),  # what is known already
                             os.path.join(f.workdir, 'metrics.json')]):
    if os.path.exists(path):
      with open(path, encoding='utf-8') as fh:
        results = json.load(fh)
      if os.path.dirname(path) != out:  # the run's provenance, not its measures
        for name in (*config.data.eval_sets, *names, 'calibration', 'decision', 'validation'):
          results.pop(name, None)
      break
  results.update({'params': steps.num_params(state), 'steps': steps.step_of(state)})
  results.pop('compute_dtype', None)
  if dtype != trained:
    results['compute_dtype'] = dtype
    logging.info('Evaluating in %s (trained in %s) into %s.', dtype, trained, out)
  os.makedirs(out, exist_ok=True)
  results = evaluate_and_report(
      state, model, out, splits, results, experiment=config.experiment, model_cfg=config.model,
      decision_cfg=uncertainty.DecisionConfig.from_config(config.decision),
      threshold=config.threshold, batch_size=config.eval_batch_size, validation=validation,
      calibration_dir=f.workdir)
  if in_run:  # the run's own TensorBoard files
    tensorboard = writers.TensorboardWriter(f.workdir)
    writers.write_figures(tensorboard, results['steps'], report.figures(f.workdir))
    tensorboard.close()
  for n in names:
    print(n, {k: v for k, v in results[n].items()
              if k not in ('ci95', 'confusion', 'calibrated', 'members', 'review',
                           'operating_point')})


def define_flags() -> None:
  """The command line's flags (defined when run as a program, not on import)."""
  flags.DEFINE_string('workdir', None, 'The training run to evaluate.')
  flags.DEFINE_list('datasets', [], 'Evaluation sets (default: the config\'s data.eval_sets).')
  flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'],
                    'Compute dtype (default: the run\'s model.dtype). Another than the run\'s '
                    'writes into --out, not into the run.')
  flags.DEFINE_string('out', '', 'Output folder (default: the run; RUN/eval_<dtype> with '
                      'another --dtype).')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
