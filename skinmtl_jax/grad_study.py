"""The gradient study: what each task's loss sends into the shared network.

For one model, a state and a batch, `steps.study` (the pure computation, beside the train step;
this module holds its CSV files, plots and command line) computes the two weighted task gradients
(segmentation: dice_weight * grad Dice; classification: cls_weight * grad CE; they add up to the
training gradient) and reports, for every parameter group (each encoder stage, each decoder
level, the segmentation head, CBAM modules, each classifier layer, and the aggregates 'encoder',
'decoder', 'classifier' and 'all'):

  seg_norm, cls_norm   l2 norms of the two task gradients
  ratio                seg_norm / cls_norm: which task dominates the group (NaN if cls_norm = 0)
  cosine               cosine similarity of the two (NaN where either is zero)
  conflict             share of the group's parameters where their signs are opposite

For reverse-learning models (mtl2+) it separates, at each classifier layer, the gradient of the training
loss that arrives through the reverse connection (the classification head stopped: the cls
logits under stop_gradient) from what arrives through the classification head (the reverse
connection stopped: FC_cls^k under stop_gradient):

  reverse_norm, head_norm, reverse_head_cosine

and, for each gated decoder level ('gated/decoderN' rows), the gradient at its channel-scaled
input feature maps (seg_norm, cls_norm as above, of the activations' gradient) and the gate's
mean, min and max (FC_cls^k).

During training (`config.grad_study_every_steps` > 0) these go to the summaries and to
`workdir/grad_study.csv`; `python -m skinmtl_jax.grad_study --workdir=RUN --out=DIR` computes
them over a run's checkpoints on a fixed, class-balanced evaluation batch and plots them.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import sys
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np

from skinmtl_jax import checkpointing, input_pipeline, losses, report, saved_run, steps
from skinmtl_jax import workdir as workdir_lib
from skinmtl_jax.config_base import ConfigError
from skinmtl_jax.datasets.files import DataError

Array = Any
CSV_COLUMNS = ('step', 'member', 'group') + steps.STUDY_QUANTITIES


def rows(step: int, result: dict[str, dict[str, Array]]) -> list[dict[str, Any]]:
  """CSV rows (one per member and group) of a stacked `study` result."""
  host = jax.device_get(result)
  out = []
  for group in sorted(host):
    values = host[group]
    num_members = np.size(next(iter(values.values())))
    for i in range(num_members):
      row = {'step': step, 'member': i, 'group': group}
      for q in steps.STUDY_QUANTITIES:
        row[q] = float(np.asarray(values[q]).reshape(-1)[i]) if q in values else math.nan
      out.append(row)
  return out


def summary_scalars(result: dict[str, dict[str, Array]]) -> dict[str, float]:
  """Members' means as flat scalars 'grad_study/<group>/<quantity>' for the metric writers."""
  host = jax.device_get(result)
  return {f'grad_study/{g}/{q}': float(np.nanmean(v)) if np.any(np.isfinite(v)) else math.nan
          for g, qs in host.items() for q, v in qs.items()}


class CsvLog:
  """Appends study rows to a CSV. On resume it first drops rows of steps at or after
  `resume_step` (written before an interruption, after the checkpoint being resumed), so the
  file has each step once."""

  def __init__(self, path: str, resume_step: int = 0):
    self.path = path
    kept = []
    if os.path.exists(path):
      with open(path, newline='', encoding='utf-8') as f:
        kept = [r for r in csv.DictReader(f) if int(r['step']) < resume_step]
    write_csv(path, kept)

  def write(self, new_rows: list[dict[str, Any]]) -> None:
    with open(self.path, 'a', newline='', encoding='utf-8') as f:
      csv.DictWriter(f, CSV_COLUMNS).writerows(new_rows)


def read_csv(path: str) -> list[dict[str, Any]]:
  with open(path, newline='', encoding='utf-8') as f:
    return [{k: (v if k == 'group' else (float(v) if v not in ('', 'nan') else math.nan))
             for k, v in r.items()} for r in csv.DictReader(f)]


# ----------------------------------------------------------------------------------- Plots


def _series(table, group, quantity, smooth: int = 1):
  """(steps, members' mean) of one quantity of one group; `smooth` > 1 takes a centred moving
  mean over that many points (per-batch values are noisy)."""
  by_step: dict[float, list[float]] = {}
  for r in table:
    if r['group'] == group and not math.isnan(r[quantity]):
      by_step.setdefault(r['step'], []).append(r[quantity])
  s = sorted(by_step)
  y = np.array([np.mean(by_step[k]) for k in s])
  if smooth > 1 and len(y) >= smooth:
    y = np.convolve(y, np.ones(smooth) / smooth, mode='same')
    edge = smooth // 2
    s, y = s[edge:len(s) - edge], y[edge:len(y) - edge]
  return np.array(s), y


def summary(table: list[dict[str, Any]], groups: list[str] | None = None) -> str:
  """A markdown table of each group's quantities averaged over all rows (steps and members):
  geometric mean for norms and ratios, arithmetic mean otherwise."""
  qs = ('seg_norm', 'cls_norm', 'ratio', 'cosine', 'conflict', 'reverse_norm', 'head_norm',
        'gate_mean')
  present = sorted({r['group'] for r in table})
  encoder, decoder, classifier, gated = _stage_groups(table)
  order = groups or (encoder + ['encoder'] + decoder + ['decoder', 'seg_head'] + classifier +
                     ['classifier'] + gated + ['all'])
  lines = ['| group | ' + ' | '.join(qs) + ' |', '|---' * (len(qs) + 1) + '|']
  for g in order:
    if g not in present:
      continue
    cells = []
    for q in qs:
      v = np.array([r[q] for r in table if r['group'] == g], float)
      v = v[np.isfinite(v)]
      if q in ('seg_norm', 'cls_norm', 'ratio', 'reverse_norm', 'head_norm'):
        v = v[v > 0]
        cells.append(f'{np.exp(np.mean(np.log(v))):.3g}' if len(v) else '')
      else:
        cells.append(f'{np.mean(v):.3f}' if len(v) else '')
    lines.append(f'| {g} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _stage_groups(table):
  groups = sorted({r['group'] for r in table})
  order = lambda g: (g.split('/')[0], int(''.join(c for c in g if c.isdigit()) or 0))
  encoder = sorted((g for g in groups if g.startswith('encoder/')), key=order)
  decoder = sorted((g for g in groups if g.startswith('decoder') and g[-1].isdigit()),
                   key=order, reverse=True)
  classifier = sorted(g for g in groups if g.startswith('classifier/'))
  gated = sorted(g for g in groups if g.startswith('gated/'))
  return encoder, decoder, classifier, gated


def plot(table: list[dict[str, Any]], path: str, title: str, smooth: int = 1) -> None:
  """One figure of the study over training: per-stage norms, dominance ratio, cosine and sign
  conflicts of the two task gradients; the classifier's reverse vs head paths; the gated
  decoder features."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  encoder, decoder, classifier, gated = _stage_groups(table)
  shared = encoder + decoder
  fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
  cmap = plt.get_cmap('viridis')
  colour = {g: cmap(i / max(len(shared) - 1, 1)) for i, g in enumerate(shared)}

  series = functools.partial(_series, smooth=smooth)

  def lines(ax, groups, quantity, styles=None, log=False, **kw):
    for g in groups:
      x, y = series(table, g, quantity)
      if len(x):
        ax.plot(x, y, label=g, color=colour.get(g), **(styles or {}), **kw)
    if log:
      ax.set_yscale('log')

  ax = axes[0, 0]
  for g in encoder + ['encoder', 'all']:
    for q, ls in (('seg_norm', '-'), ('cls_norm', '--')):
      x, y = series(table, g, q)
      y = np.where(y > 0, y, np.nan)
      if len(x):
        ax.plot(x, y, ls, color=colour.get(g, 'k' if g == 'all' else 'grey'),
                label=f'{g} {q.split("_")[0]}')
  ax.set_yscale('log')
  ax.set_title('Task gradient norms (solid: seg, dashed: cls)')
  ax.legend(fontsize=6, ncol=2)

  ax = axes[0, 1]
  lines(ax, shared + ['encoder', 'all'], 'ratio', log=True)
  ax.axhline(1.0, color='k', lw=0.5)
  ax.set_title('seg_norm / cls_norm (> 1: seg dominates)')
  ax.legend(fontsize=6, ncol=2)

  ax = axes[0, 2]
  lines(ax, shared + ['encoder', 'all'], 'cosine')
  ax.axhline(0.0, color='k', lw=0.5)
  ax.set_title('Cosine of the two task gradients')
  ax.legend(fontsize=6, ncol=2)

  ax = axes[1, 0]
  lines(ax, shared + ['encoder', 'all'], 'conflict')
  ax.set_title('Share of parameters with opposite signs')
  ax.legend(fontsize=6, ncol=2)

  ax = axes[1, 1]
  for i, g in enumerate(classifier):
    c = plt.get_cmap('tab10')(i)
    for q, ls in (('reverse_norm', '-'), ('head_norm', '--')):
      x, y = series(table, g, q)
      y = np.where(y > 0, y, np.nan)
      if len(x) and np.any(np.isfinite(y)):
        ax.plot(x, y, ls, color=c, label=f'{g} {q.split("_")[0]}')
  ax.set_yscale('log')
  ax.set_title('Classifier: reverse path (solid), head (dashed)')
  if ax.lines:
    ax.legend(fontsize=6)
  else:
    ax.text(0.5, 0.5, 'no reverse connection\n(or reverse path gives zero everywhere)',
            ha='center', va='center', transform=ax.transAxes)

  ax = axes[1, 2]
  gate_ax = ax.twinx() if gated else None
  for i, g in enumerate(gated):
    c = plt.get_cmap('tab10')(i)
    x, y = series(table, g, 'seg_norm')
    if len(x):
      ax.plot(x, y, color=c, label=f'{g} |grad|')
    x, y = series(table, g, 'gate_mean')
    if len(x):
      gate_ax.plot(x, y, ':', color=c, label=f'{g} mean gate')
  if gate_ax is not None:
    gate_ax.set_ylabel('mean FC_cls^k gate (dotted)')
  ax.set_title('Gated decoder inputs: |grad| (solid), gate (dotted)')
  if gated:
    ax.legend(fontsize=6, loc='upper left')
  else:
    ax.text(0.5, 0.5, 'no gated decoder levels', ha='center', va='center',
            transform=ax.transAxes)
  for a in axes.flat:
    a.set_xlabel('step')
  fig.suptitle(title + (f' (moving mean over {smooth} points)' if smooth > 1 else ''))
  fig.tight_layout()
  report.save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------ Over checkpoints


def fixed_batch(split, num_images: int) -> dict[str, np.ndarray]:
  """The first num_images // 2 melanomas and the first benign images to fill `num_images`, in
  split order: the same batch for every checkpoint, with both classes present."""
  labels = np.asarray(split.labels)
  mel = np.flatnonzero(labels == 1)[:num_images // 2]
  ben = np.flatnonzero(labels == 0)[:num_images - len(mel)]
  idx = sorted(np.concatenate([mel, ben]).tolist())
  return input_pipeline._stack([split.source[i] for i in idx])  # pylint: disable=protected-access


def study_checkpoints(workdir: str, split_name: str | None, num_images: int
                      ) -> tuple[list[dict[str, Any]], Any]:
  """Study rows for every checkpoint of the run in `workdir` (and the run's config)."""
  config, model, state = saved_run.load_run(workdir)
  split = input_pipeline.get_split(config.data, split_name or config.data.eval_sets[0])
  batch = fixed_batch(split, num_images)
  fn = steps.make_study_step(model, loss=losses.LossConfig.from_config(config.loss),
                             shared_batch=True)
  manager = checkpointing.create_manager(workdir, read_only=True)
  table = []
  try:
    for step in manager.all_steps():
      try:
        state = checkpointing.restore(manager, state, step=step)
      except checkpointing.Rotated:  # training in the same workdir removed it meanwhile
        logging.info('The checkpoint of step %d was rotated away by the training in %s; '
                     'skipped.', step, workdir)
        continue
      table += rows(step, fn(state, batch))
      logging.info('Studied the checkpoint of step %d.', step)
  finally:
    manager.close()
  return table, config


def write_csv(path: str, table: list[dict[str, Any]]) -> None:
  with workdir_lib.atomic_write(path, newline='') as f:
    w = csv.DictWriter(f, CSV_COLUMNS)
    w.writeheader()
    w.writerows(table)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  checkpointing.quiet_orbax_logging()
  try:
    saved_run.check_run_dir(f.workdir)  # before --out is made: a wrong --workdir leaves nothing
    os.makedirs(f.out, exist_ok=True)
    table, config = study_checkpoints(f.workdir, f.split, f.num_images)
  except (checkpointing.CheckpointError, ConfigError, DataError, OSError) as e:
    sys.exit(f'skinmtl_jax.grad_study: {e}')
  name = config.experiment
  write_csv(os.path.join(f.out, 'grad_study_checkpoints.csv'), table)
  plot(table, os.path.join(f.out, 'grad_study_checkpoints.png'),
       f'{name}: task gradients on a fixed batch of {f.num_images} images, per checkpoint')
  sections = [f'# Gradient study of {name}', '',
              f'## Per checkpoint, fixed batch of {f.num_images} images', '', summary(table), '']
  print(f'Wrote {f.out}/grad_study_checkpoints.csv and .png ({len(table)} rows).')
  during = os.path.join(f.workdir, 'grad_study.csv')
  if os.path.exists(during):
    training = read_csv(during)
    plot(training, os.path.join(f.out, 'grad_study_training.png'),
         f'{name}: task gradients on the training batches', smooth=5)
    sections += ['## During training, on the training batches', '', summary(training), '']
    print(f'Wrote {f.out}/grad_study_training.png from {during}.')
  sections += ['Norms and ratios: geometric means over steps and members; cosine, conflict and '
               'gate: arithmetic means. See skinmtl_jax/grad_study.py for the definitions.']
  with open(os.path.join(f.out, 'summary.md'), 'w', encoding='utf-8') as fh:
    fh.write('\n'.join(sections) + '\n')
  print(f'Wrote {f.out}/summary.md.')


def define_flags() -> None:
  """The command line's flags (defined when run as a program, not on import)."""
  flags.DEFINE_string('workdir', None, 'The training run (its --workdir).')
  flags.DEFINE_string('out', None, 'Folder for the CSV and the plots.')
  flags.DEFINE_string('split', None, 'Evaluation set of the fixed batch (default: the run\'s '
                      'first data.eval_sets).')
  flags.DEFINE_integer('num_images', 16, 'Images in the fixed batch (half melanomas, if the '
                       'set has that many).')
  flags.mark_flags_as_required(['workdir', 'out'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
