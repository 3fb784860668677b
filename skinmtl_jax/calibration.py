"""Calibration of the melanoma probability: Platt scaling on a held-out validation split.

The enlargement trains on about 49 % melanomas (69 % with mtl4's extra ones) while the test
sets hold about 20 %, and networks trained to zero loss are over-confident; both bend the
probability away from the observed frequency. A temperature T and a bias b on the melanoma
logit z = log(p / (1 - p)),

    p_calibrated = sigmoid(z / T + b),

fitted by maximum likelihood on validation images at the natural class balance (Platt 1999;
T alone is Guo et al.'s temperature scaling, b corrects the prior shift), fix both. The map is
monotonic, so AUC and AP do not change; the decisions at the threshold and ECE / Brier do.

`calibration.json` in the run's folder holds the fit, the checkpoint step it was fitted for and
the fingerprint of that checkpoint's model (steps.model_fingerprint); `predict` applies it only
to that model. T is kept within [T_MIN, T_MAX]: a fit on a few separable images drives T
towards 0 (a step function), which no probability should be read through; a fit at the bound
says so in the log and in the file ('at_bound'). `save_fitted` and `load_fitted` tie any file
fitted on the validation split to its checkpoint and model this way (decision.json, the
operating point and review thresholds of skinmtl_jax/uncertainty.py, too).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import numpy as np

from skinmtl_jax import workdir as workdir_lib

FILE_NAME = 'calibration.json'
_EPS = 1e-7
T_MIN, T_MAX = 0.05, 20.0   # the temperatures a fit may reach (and a file may hold)
B_MAX = 20.0                # |bias|


def logit(probs: np.ndarray) -> np.ndarray:
  p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
  return np.log(p) - np.log1p(-p)


def apply(probs: np.ndarray, calibration: dict[str, Any] | None) -> np.ndarray:
  """The calibrated melanoma probabilities (`probs` unchanged without a calibration)."""
  if calibration is None:
    return np.asarray(probs, np.float64)
  z = logit(probs) / calibration['temperature'] + calibration['bias']
  return 1 / (1 + np.exp(-z))


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean negative log-likelihood (binary cross-entropy) of the melanoma probabilities."""
  y = np.asarray(labels, np.float64)
  p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def fit(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any] | None:
  """Fits T > 0 and b by maximum likelihood (scipy's L-BFGS) with Platt's targets
  ((N+ + 1) / (N+ + 2) for melanomas, 1 / (N- + 2) for benign images), which keep the fit
  finite when the validation images are perfectly separated. None (no calibration) when the
  validation set lacks either class.

  Returns:
    {'temperature', 'bias', 'n', 'melanomas', 'nll_before', 'nll_after'} (NLLs on the
    validation images, against their labels).
  """
  from scipy import optimize  # pylint: disable=import-outside-toplevel
  y = np.asarray(labels, np.float64)
  n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
  if n_pos == 0 or n_neg == 0:
    logging.warning('Calibration not fitted: the validation split has %d melanomas and %d '
                    'benign images (both are needed).', n_pos, n_neg)
    return None
  z = logit(probs)
  t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

  def loss_and_grad(theta):
    log_a, b = theta  # a = 1 / T, kept positive: the map stays increasing
    a = np.exp(log_a)
    s = a * z + b
    loss = np.mean(np.logaddexp(0, s) - t * s)
    r = 1 / (1 + np.exp(-s)) - t
    return loss, np.array([np.mean(r * a * z), np.mean(r)])

  bounds = [(-np.log(T_MAX), -np.log(T_MIN)), (-B_MAX, B_MAX)]
  res = optimize.minimize(loss_and_grad, np.zeros(2), jac=True, method='L-BFGS-B',
                          bounds=bounds)
  result = {'temperature': float(np.exp(-res.x[0])), 'bias': float(res.x[1]), 'n': len(y),
            'melanomas': n_pos, 'nll_before': nll(y, probs)}
  result['nll_after'] = nll(y, apply(probs, result))
  at_bound = [name for name, v, (lo, hi) in zip(('temperature', 'bias'), res.x, bounds)
              if np.isclose(v, lo) or np.isclose(v, hi)]
  if at_bound:
    result['at_bound'] = at_bound
    logging.warning('Calibration on %d images (%d melanomas): the fit reached the bound of its '
                    '%s (T in [%g, %g], |b| <= %g): too few or perfectly separated validation '
                    'images; read the calibrated probabilities with care.', len(y), n_pos,
                    ' and '.join(at_bound), T_MIN, T_MAX, B_MAX)
  return result


def save_fitted(workdir: str, name: str, fitted: dict[str, Any] | None, step: int,
                model: str) -> None:
  """Writes `workdir/name`, what was fitted on the validation split for checkpoint `step` whose
  model has the fingerprint `model` (removes the file for None): calibration.json here,
  decision.json (skinmtl_jax/uncertainty.py)."""
  path = os.path.join(workdir, name)
  if fitted is None:
    if os.path.exists(path):
      os.remove(path)
    return
  with workdir_lib.atomic_write(path) as f:
    json.dump({**fitted, 'step': int(step), 'model': model}, f, indent=1)


def save(workdir: str, calibration: dict[str, Any] | None, step: int, model: str) -> None:
  """Writes `workdir/calibration.json` for checkpoint `step` whose model has the fingerprint
  `model` (removes the file when there is no calibration)."""
  save_fitted(workdir, FILE_NAME, calibration, step, model)


class Invalid(ValueError):
  """A file fitted on the validation split (calibration.json, decision.json) holds what no fit
  can be."""


def _validated(c: Any) -> dict[str, Any]:
  if not isinstance(c, dict):
    raise Invalid(f'expected an object, got {type(c).__name__}')
  t, b = c.get('temperature'), c.get('bias')
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (t, b)):
    raise Invalid(f'temperature {t!r} and bias {b!r} must be numbers')
  if not (np.isfinite(t) and T_MIN <= t <= T_MAX):
    raise Invalid(f'temperature {t} outside [{T_MIN}, {T_MAX}]')
  if not (np.isfinite(b) and abs(b) <= B_MAX):
    raise Invalid(f'bias {b} outside [-{B_MAX}, {B_MAX}]')
  return {**c, 'temperature': float(t), 'bias': float(b)}


def load_fitted(workdir: str, name: str, step: int, model: str | None, validated, *,
                warn_missing: bool = False, what: str,
                what_missing: str | None = None) -> dict[str, Any] | None:
  """`workdir/name` as `save_fitted` wrote it, checked by `validated` (raises Invalid), if it
  was fitted for checkpoint `step` (and, given `model`, the model with that fingerprint);
  otherwise None with a warning saying `what` is then missing: when the file is for another
  checkpoint (evaluate fits it again), another model, unreadable or invalid, and, with
  `warn_missing`, when there is none (then saying `what_missing`, if given)."""
  path = os.path.join(workdir, name)
  refit = 'python -m skinmtl_jax.evaluate --workdir=... fits it again'
  if not os.path.exists(path):
    if warn_missing:
      logging.warning('%s not found: %s (%s).', path, what_missing or what, refit)
    return None
  try:
    with open(path, encoding='utf-8') as f:
      c = validated(json.load(f))
    if int(c['step']) != int(step):
      logging.warning('%s was fitted for step %s, the checkpoint is step %d: %s (%s).', path,
                      c['step'], step, what, refit)
      return None
    if model is not None and c.get('model') != model:
      logging.warning('%s was fitted for another model than the checkpoint of step %d (%s): %s '
                      '(%s).', path, step, 'no model fingerprint in the file'
                      if 'model' not in c else 'its fingerprint differs', what, refit)
      return None
    return c
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('%s is unreadable or invalid (%s): %s (%s).', path, e, what, refit)
    return None


def load(workdir: str, step: int, model: str | None = None, *,
         warn_missing: bool = False) -> dict[str, Any] | None:
  """The calibration fitted for checkpoint `step` (and, given `model`, for the model with that
  fingerprint), or None with a warning: when the file is for another checkpoint (evaluate refits
  it), for another model, unreadable or invalid, and, with `warn_missing`, when there is none."""
  return load_fitted(workdir, FILE_NAME, step, model, _validated, warn_missing=warn_missing,
                     what='no calibration applied', what_missing='no calibrated probability')
