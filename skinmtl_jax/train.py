"""Training and evaluation loop: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from skinmtl_jax import (checkpointing, device_input, evaluate, grad_study, input_pipeline,
                         losses, models, parallel, report, splits, steps, uncertainty,
                         writers)
from skinmtl_jax import preemption as preemption_lib
from skinmtl_jax import workdir as workdir_lib
from skinmtl_jax import config_base


def num_steps(config: ml_collections.ConfigDict, examples_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * (examples_per_epoch // config.batch_size)


_WATCHED_TERMS = ('loss', 'dice_loss', 'cls_loss', 'l2_grads')


def _check_finite(metrics_by_step, last_good_checkpoint) -> None:
  """Raises FloatingPointError naming the first step with a non-finite loss or gradient."""
  for step, m in metrics_by_step:
    # One value per member; a single member's is shown as a plain number.
    show = lambda v: np.asarray(v).item() if np.size(v) == 1 else np.asarray(v).tolist()
    bad = [f'{k}={show(m[k])}' for k in _WATCHED_TERMS
           if k in m and not np.all(np.isfinite(m[k]))]
    if bad:
      raise FloatingPointError(
          f'Step {step}: {", ".join(bad)}. Stopped without saving; the latest checkpoint '
          f'(step {last_good_checkpoint}) is the last good one. Lower optim.learning_rate or '
          'check the data, then rerun to resume from it.')


def _write_curves(writer, workdir: str) -> None:
  """curves.png from scalars.jsonl, at the end of every run (a failure to plot is logged, never
  raised: it must not hide why the run ended)."""
  try:
    writer.flush()
    report.write_curves(workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('curves.png not written: %s: %s', type(e).__name__, e)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the configured model in `workdir`, resuming from its latest checkpoint if any,
  evaluates it on every set in `config.data.eval_sets`, and writes `workdir/metrics.json`.

  One run at a time per workdir (a second raises workdir.WorkdirBusy), and SIGTERM at any
  point raises preemption.Preempted (see skinmtl_jax/workdir.py and skinmtl_jax/preemption.py).

  Returns:
    The metrics.json content.
  """
  config_base.validate_config(config)
  with preemption_lib.SigtermRaises(workdir), workdir_lib.lock(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  # Checks before anything is written: a rerun must keep its config (but for the changeable
  # fields) and its training examples.
  changes = workdir_lib.check_config(config, workdir)
  mesh = parallel.make_mesh(config.sharding, config.num_seeds, config.batch_size)
  logging.info('Mesh %s over %d device(s) in %d process(es).', dict(mesh.shape),
               jax.device_count(), jax.process_count())
  data = _Data(config, mesh)
  resuming = checkpointing.has_checkpoint(workdir)
  record = splits.training_set_record(
      data.train, data.validation, (config.data.enlarge_benign, config.data.enlarge_melanoma))
  workdir_lib.check_training_set(workdir, record, resuming=resuming)

  # The run's files.
  if not resuming and jax.process_index() == 0:
    workdir_lib.clear_stale_files(workdir)
  workdir_lib.save_config(config, workdir)
  workdir_lib.save_training_set(workdir, record, resuming=resuming)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_hparams(config.to_dict())

  # Model, optimizer and state (resumed from the latest checkpoint, if any).
  model = models.create_model(config.model)
  tx = steps.create_optimizer(config.optim, data.total_steps)
  state = steps.create_train_state(model, tx, steps.member_keys(config.seed, config.num_seeds),
                                   tuple(config.data.image_size),
                                   sharding=parallel.state_sharding(mesh))
  writers.log_parameter_overview(parallel.to_local(steps.member(state.params, 0)))
  logging.info('Parameters: %d (%.2f M) per member.', steps.num_params(state),
               steps.num_params(state) / 1e6)
  manager = checkpointing.create_manager(workdir, max_to_keep=config.max_checkpoints_to_keep)
  if manager.latest_step() is not None:
    state = checkpointing.restore(manager, state)
    logging.info('Resumed from step %d.', steps.step_of(state))
  data.train_input.start(steps.step_of(state))
  rescheduled = _warn_about_changes(config, changes, data, steps.step_of(state))

  # Steps: the same loss, batches and member loop for the update and the gradient study.
  step_kw = dict(loss=losses.LossConfig.from_config(config.loss),
                 shared_batch=config.seed_data_order == 'shared', mesh=mesh,
                 inputs=data.train_input.inputs, member_loop=config.member_loop)
  train_step = steps.make_train_step(model, tx, **step_kw)
  study = _GradStudy(config, model, step_kw, workdir, writer)
  validate = _Validation(config, model, data, writer)

  # Loop.
  progress = writers.ReportProgress(
      num_train_steps=data.total_steps, writer=writer, every_steps=config.log_every_steps,
      images_per_step=config.num_seeds * config.batch_size, members=config.num_seeds,
      batch_size=config.batch_size)
  t0 = time.time()
  try:
    state = _train_loop(state, train_step, data.train_input, manager, writer, progress, study,
                        validate, total_steps=data.total_steps, log_every=config.log_every_steps,
                        checkpoint_every=config.checkpoint_every_steps)
  finally:
    # Whatever stops the loop (a non-finite loss, SIGTERM, an exception), finish the save in
    # flight, so the latest good checkpoint is complete on disk; a SIGTERM meanwhile waits for
    # it (then raises Preempted, unless the loop is already leaving on an exception).
    with preemption_lib.SigtermDeferred(_after_the_last_step(manager)):
      manager.wait_until_finished()
      data.train_input.close()
      if jax.process_index() == 0:
        _write_curves(writer, workdir)

  # Evaluation.
  results = {'params': steps.num_params(state), 'steps': steps.step_of(state),
             **rescheduled,
             'num_seeds': config.num_seeds, 'train_seconds_this_run': round(time.time() - t0, 1),
             'train_examples': len(data.train.source), **data.train.info}
  results = _evaluate(config, state, model, workdir, data, results, writer)
  manager.close()
  return results


def _warn_about_changes(config, changes: dict, data: '_Data', step: int) -> dict[str, Any]:
  """Says what a resume with changed changeable fields does to the numbers: a new number of
  steps re-stretches the learning rate's decay over the new total (the rate at the resumed
  step jumps), so training 12 steps and extending to 24 is not training 24; a new threshold
  moves every decision of the report (its tables say at which threshold). Returns the
  metrics.json entry of a re-stretched schedule."""
  out = {}
  if {'num_train_steps', 'num_epochs'} & set(changes) and step:
    old = ml_collections.ConfigDict(config.to_dict())
    for k in ('num_train_steps', 'num_epochs'):
      if k in changes:
        old[k] = changes[k][0]
    before = num_steps(old, data.train_input.examples_per_epoch)
    if before != data.total_steps:
      lr = lambda total: steps.learning_rate_schedule(config.optim, total)(step)
      logging.warning(
          'The run had %d steps in all and now has %d: the learning rate decays over the new '
          'total, so at step %d it jumps from %.3g to %.3g. This run is not the one a %d-step '
          'run from the start would be (recorded in metrics.json as lr_schedule_restretched).',
          before, data.total_steps, step, float(lr(before)), float(lr(data.total_steps)),
          data.total_steps)
      out['lr_schedule_restretched'] = {'at_step': step, 'from_total': before,
                                        'to_total': data.total_steps}
  if 'threshold' in changes:
    logging.warning('threshold %s -> %s: every decision of the evaluation (the report\'s '
                    'tables say at which threshold) is at the new one.', *changes['threshold'])
  return out


class _Data:
  """The run's data: the training input (global device batches, prefetched; the training split
  on the device when it fits), the validation split held out of it, the evaluation sets, and
  the number of steps."""

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    # The validation split (data.validation_fraction) is held out of the training data here.
    self.train, self.validation = input_pipeline.train_and_validation(config.data)
    # Fetched (and prepared) before training, so a missing test set stops the run at once.
    self.eval = {s: input_pipeline.get_split(config.data, s) for s in config.data.eval_sets}
    self.train_input = device_input.TrainInput(
        self.train, config.data, mesh, batch_size=config.batch_size, num_seeds=config.num_seeds,
        data_seed=config.seed if config.data_seed < 0 else config.data_seed,
        shared_order=config.seed_data_order == 'shared')
    self.total_steps = num_steps(config, self.train_input.examples_per_epoch)
    logging.info('%s: %d examples, %d after enlargement; %d steps of batch %d; %d member(s); '
                 'training data %s.', self.train.name, len(self.train.source),
                 self.train_input.examples_per_epoch, self.total_steps, config.batch_size,
                 config.num_seeds, 'on the device' if self.train_input.resident else 'streamed')


class _GradStudy:
  """The gradient study every `config.grad_study_every_steps` steps (0: never), on the step's
  batch before its update: rows in workdir/grad_study.csv (labelled with the updates done) and
  the members' means in TensorBoard only (too many scalars for the log)."""

  def __init__(self, config, model, step_kw: dict, workdir: str, writer):
    self.every = config.grad_study_every_steps
    self.step = steps.make_study_step(model, **step_kw) if self.every else None
    self.writer = writer.tensorboard
    self.log = None
    self._path = os.path.join(workdir, 'grad_study.csv')

  def resume(self, step: int) -> None:
    """Opens the CSV (process 0), dropping rows of steps at or after `step`: written after
    the checkpoint the run resumes from."""
    if self.every and jax.process_index() == 0:
      self.log = grad_study.CsvLog(self._path, resume_step=step)

  def __call__(self, step: int, state, batch) -> None:
    if not self.every or (step - 1) % self.every:
      return
    result = self.step(state, batch)
    if self.log is not None:
      self.log.write(grad_study.rows(step - 1, result))
    if self.writer is not None:
      self.writer.write_scalars(step - 1, grad_study.summary_scalars(result))


class _Validation:
  """Every `config.eval_every_epochs` epochs (0: never), the measures of the validation split
  (held out of training; what the calibration is fitted on) as validation/<measure> scalars:
  the members' mean, validation/ensemble_<measure> for K > 1. The learning curve that says when
  training has levelled off, without looking at a test set."""

  KEYS = ('dice', 'iou', 'auc', 'ap', 'brier', 'recall_melanoma', 'tnr')

  def __init__(self, config, model, data: '_Data', writer):
    epochs = config.eval_every_epochs
    steps_per_epoch = max(1, data.train_input.examples_per_epoch // config.batch_size)
    self.every = epochs * steps_per_epoch if data.validation is not None else 0
    if epochs and data.validation is None:
      logging.warning('eval_every_epochs=%d: there is no validation split '
                      '(data.validation_fraction=0); no validation curve.', epochs)
    self._split = data.validation
    self._writer = writer
    self._batch_size = config.eval_batch_size
    self._threshold = config.threshold
    self._eval_step = jax.jit(functools.partial(steps.eval_step, model=model,
                                                threshold=config.threshold))

  def __call__(self, step: int, state) -> None:
    if not self.every or step % self.every:
      return
    r = evaluate.evaluate_split(self._eval_step, parallel.to_local(state), self._split,
                                batch_size=self._batch_size, threshold=self._threshold,
                                bootstrap_samples=0)
    scalars = {f'validation/{k}': r[k] for k in self.KEYS if r.get(k) is not None}
    scalars.update({f'validation/ensemble_{k}': r['ensemble'][k] for k in self.KEYS
                    if r.get('ensemble', {}).get(k) is not None})
    self._writer.write_scalars(step, scalars)


def _train_loop(state, train_step, train_input, manager, writer, progress, study, validate, *,
                total_steps: int, log_every: int, checkpoint_every: int):
  """Steps from the state's step to `total_steps`: logs the members' mean metrics every
  `log_every` steps, saves every `checkpoint_every` steps, at the end and on SIGTERM (then
  raises Preempted), and stops on a non-finite loss or gradient before any save."""
  start_step = steps.step_of(state)
  study.resume(start_step)
  pending = []  # (step, metrics) since the last log; read back only at log and save steps
  with preemption_lib.SigtermFlag(manager) as preemption:
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_input)
      study(step, state, batch)
      state, m = train_step(state, batch)
      pending.append((step, m))
      progress(step)
      preempted = preemption.reached(step)  # read once: the signal may land at any moment
      save_now = step % checkpoint_every == 0 or step == total_steps or preempted
      if step % log_every == 0 or save_now:
        host = [(i, jax.device_get(x)) for i, x in pending]
        _check_finite(host, manager.latest_step())  # before any save: no bad checkpoint
        if step % log_every == 0 or step == total_steps:
          means = jax.tree.map(lambda *xs: float(np.mean(xs)), *[x for _, x in host])
          if 'learning_rate' in host[-1][1]:  # the current one, not the window's mean
            means['learning_rate'] = float(np.mean(host[-1][1]['learning_rate']))
          writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
          pending = []
      validate(step, state)
      if save_now:
        checkpointing.save(manager, state)
      if preempted:
        writer.flush()
        raise preemption_lib.Preempted(f'SIGTERM received: saved the checkpoint of step {step} in '
                        f'{manager.directory}; run the same command again to resume.')
    if preemption.received:  # landed in the last step after its flag was read: not ignored
      raise preemption_lib.Preempted(_after_the_last_step(manager))
  return state


def _after_the_last_step(manager) -> str:
  """What a SIGTERM in or after the last training step says (its checkpoint is complete once
  the save in flight is, which the caller's `finally` waits for)."""
  return (f'SIGTERM received at or after the last training step: its checkpoint is saved in '
          f'{manager.directory}; run the same command again to evaluate.')


def _evaluate(config, state, model, workdir: str, data: _Data, results: dict, writer) -> dict:
  """Evaluates on every set and the validation split; writes metrics.json, the report and the
  figures (process 0), and the headline numbers to the writers."""
  # By identity: how many images of each evaluation set the run trained on (0 but under the
  # paper's protocol).
  train_ids = set(data.train.ids)
  overlap = {name: len(train_ids & set(split.ids)) for name, split in data.eval.items()}
  results['trained_on_eval_images'] = overlap
  if any(overlap.values()) or (config.data.extra_melanomas
                               and config.data.paper_protocol_train_on_test_images):
    results['trained_on_test_images'] = True
  # Every process evaluates its own copy (no collectives); process 0 writes the artifacts.
  results = evaluate.evaluate_and_report(
      parallel.to_local(state), model, workdir, data.eval, results,
      experiment=config.experiment, model_cfg=config.model,
      decision_cfg=uncertainty.DecisionConfig.from_config(config.decision),
      threshold=config.threshold, batch_size=config.eval_batch_size,
      write=jax.process_index() == 0, validation=data.validation)
  for name in config.data.eval_sets:
    r = results[name]
    writer.write_scalars(results['steps'], {f'{name}/{key}': v for key, v in r.items()
                                            if isinstance(v, float)})
    logging.info('%s: %s', name, {key: v for key, v in r.items() if isinstance(v, float)})
  if writer.tensorboard is not None:
    writers.write_figures(writer.tensorboard, results['steps'], report.figures(workdir))
  writer.flush()
  return results
