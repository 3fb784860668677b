"""The pure train and eval steps, and the train state they carry.

`train_step(state, batch) -> (state, metrics)` is a pure function of explicit pytrees for one
model; the model, optimizer and loss weights are bound with `functools.partial`. Training always
runs a *seed ensemble*: the state carries a leading member axis (K = config.num_seeds, 1 for an
ordinary run) and `make_train_step` compiles `jax.jit(over_members(train_step))` once, so K
independent models train in one step and K = 1 goes through the same code. `over_members` is
`jax.vmap` on accelerators; on a CPU it unrolls the K members in the program, because XLA:CPU
runs a vmapped convolution (a grouped one, per-member weights) several times slower than K
ordinary ones (`member_loop`, below).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from skinmtl_jax import device_input, gradients, losses, parallel

Array = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training, as one pytree."""

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any


def step_of(state: TrainState) -> int:
  """The step of a (stacked) state as an int."""
  # Members move in lockstep, so any member's step will do: this process's first shard (a
  # multi-host state split by member is not fully addressable from one process).
  step = state.step
  if isinstance(step, jax.Array):
    step = step.addressable_shards[0].data
  return int(np.asarray(step).reshape(-1)[0])


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, num_train_steps: int):
  """The learning rate decaying exponentially from its initial to its final value
  (config.optim) over `num_train_steps`."""
  o = optim_cfg
  return optax.exponential_decay(o.learning_rate, transition_steps=max(num_train_steps, 1),
                                 decay_rate=o.final_learning_rate / o.learning_rate)


def create_optimizer(optim_cfg: ml_collections.ConfigDict,
                     num_train_steps: int) -> optax.GradientTransformation:
  """Adam of `optim_cfg` (config.optim) with `learning_rate_schedule`."""
  o = optim_cfg
  return optax.inject_hyperparams(optax.adam)(
      learning_rate=learning_rate_schedule(o, num_train_steps), b1=o.b1, b2=o.b2, eps=o.eps)


def to_float_images(images: Array) -> Array:
  """uint8 images (as the input pipeline delivers them) to float32 in [0, 1]; floats pass."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images


def init_variables(model, key: Array, images: Array) -> dict:
  """`model.init(key, images)`, compiled without optimisation since it runs once.

  flax's init op by op, or an optimised compile of its threefry initialisers, takes several
  times as long for the U-Net on a CPU.
  """
  init = jax.jit(functools.partial(model.init, train=False))
  compiled = init.lower(key, images).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  variables = compiled(key, images)
  # Not model state: what `sow` and `perturb` (gradient study) recorded during init.
  return {k: v for k, v in variables.items() if k not in ('intermediates', 'perturbations')}


def create_train_state(model, tx: optax.GradientTransformation, keys: Array,
                       image_shape: tuple[int, int], sharding=None) -> TrainState:
  """Initialises one member per key (`keys` shaped (K,)): a TrainState whose leaves all carry a
  leading member axis of size K. Member i equals a single-key init from keys[i].

  `sharding` (a jax.sharding.Sharding for every leaf, see parallel.state_sharding) places the
  state on a device mesh; None leaves it on the default device.
  """

  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape, 3), jnp.float32), train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))

  # Compiled without optimisation since it runs once (see init_variables).
  compiled = jax.jit(jax.vmap(init), out_shardings=sharding).lower(keys).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return compiled(keys)


def member_keys(seed: int, num_seeds: int) -> Array:
  """Keys of the K members: member i is initialised from jax.random.key(seed + i), so it is the
  same model as an ordinary run with seed + i."""
  return jnp.stack([jax.random.key(seed + i) for i in range(num_seeds)])


def num_params(state: TrainState) -> int:
  """Parameters of one member."""
  return int(sum(x[0].size for x in jax.tree.leaves(state.params)))


def model_fingerprint(state: TrainState) -> str:
  """SHA-256 of the parameters and BatchNorm statistics of every member: which model a file
  fitted on it (calibration.json) belongs to. The arrays must be addressable from this process
  (parallel.to_local)."""
  digest = hashlib.sha256()
  for x in jax.tree.leaves((state.params, state.batch_stats)):
    a = np.ascontiguousarray(jax.device_get(x))
    digest.update(str((a.dtype, a.shape)).encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def member(state, i: int):
  """Member i of a stacked state (or of any pytree with a leading member axis)."""
  return jax.tree.map(lambda x: x[i], state)




def unrolls_members(member_loop: str = 'auto') -> bool:
  """'auto': unroll on a CPU, vmap elsewhere (config.member_loop)."""
  return member_loop == 'unroll' or (member_loop == 'auto' and jax.default_backend() == 'cpu')


def over_members(fn, in_axes: tuple, member_loop: str = 'auto'):
  """`fn` mapped over the leading member axis of the arguments whose in_axes is 0 (None:
  shared by every member); every output gets the member axis.

  `jax.vmap`, or, when `unrolls_members(member_loop)`, one call of `fn` per member written
  out in the program and the results stacked: the same computation member by member (the
  same results up to float round-off), which XLA:CPU runs as ordinary convolutions instead
  of grouped ones (benchmarks/seed_ensemble.py).
  """
  if not unrolls_members(member_loop):
    return jax.vmap(fn, in_axes=in_axes)

  def unrolled(*args):
    k = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
    outs = [fn(*[a if ax is None else member(a, i) for a, ax in zip(args, in_axes)])
            for i in range(k)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def forward_loss_terms(params, batch_stats, batch, *, model, dice_smooth: float = 1.0):
  """The training forward pass: (unweighted loss terms, (outputs, updated batch_stats))."""
  outputs, new_vars = model.apply({'params': params, 'batch_stats': batch_stats},
                                  to_float_images(batch['image']), train=True,
                                  mutable=['batch_stats'])
  terms = losses.loss_terms(outputs, batch, dice_smooth=dice_smooth)
  return terms, (outputs, new_vars.get('batch_stats', {}))



def train_step(state: TrainState, batch: dict[str, Array], *, model, tx,
               loss: losses.LossConfig = losses.LossConfig()
               ) -> tuple[TrainState, dict[str, Array]]:
  """One optimisation step on `batch` ({'image', 'mask', 'label'}).

  `loss.balancing` says how the two task gradients combine: 'weighted', the gradient of the
  paper's fixed-weight loss (Eq. 3); 'pcgrad', PCGrad on the two weighted task gradients
  (`gradients.pcgrad`), which also reports their cosine as 'task_cosine'.

  Returns:
    (new state, metrics) where metrics holds the loss, each task's loss, the batch accuracy of
    the diagnosis, and the l2 norms of gradients, parameters and updates.
  """
  terms_fn = functools.partial(forward_loss_terms, batch_stats=state.batch_stats, batch=batch,
                               model=model, dice_smooth=loss.dice_smooth)
  weights = loss.weights
  extra = {}
  if loss.balancing == 'weighted':
    def loss_fn(params):
      terms, aux = terms_fn(params)
      return losses.weighted_loss(terms, weights), (terms, aux)
    (total, (terms, (outputs, batch_stats))), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
  else:
    by_task, terms, (outputs, batch_stats) = gradients.task_gradients(
        terms_fn, state.params, weights)
    if set(by_task) != set(losses.TASKS):
      raise ValueError('loss.balancing="pcgrad" needs both tasks (model.classify=True).')
    grads = gradients.pcgrad(by_task['seg'], by_task['cls'])
    total = losses.weighted_loss(terms, weights)
    dot = gradients.tree_vdot(by_task['seg'], by_task['cls'])
    extra['task_cosine'] = dot / (optax.tree.norm(by_task['seg']) *
                                  optax.tree.norm(by_task['cls']) + 1e-30)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': total, **terms, **extra, 'l2_grads': optax.tree.norm(grads),
             'l2_params': optax.tree.norm(params), 'l2_updates': optax.tree.norm(updates)}
  if hasattr(opt_state, 'hyperparams'):  # optax.inject_hyperparams
    metrics['learning_rate'] = opt_state.hyperparams['learning_rate']
  if 'cls_logits' in outputs:
    metrics['accuracy'] = jnp.mean(jnp.argmax(outputs['cls_logits'], -1) == batch['label'])
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
  return new_state, metrics


def predict(variables: dict, images: Array, *, model) -> dict[str, Array]:
  """Lesion probability maps (batch, H, W) and melanoma probabilities (batch,), where present."""
  outputs = model.apply(variables, to_float_images(images), train=False)
  out = {}
  if 'seg_logits' in outputs:
    out['lesion_prob'] = jax.nn.softmax(outputs['seg_logits'], axis=-1)[..., 1]
  if 'cls_logits' in outputs:
    out['melanoma_prob'] = jax.nn.softmax(outputs['cls_logits'], axis=-1)[..., 1]
  return out


def make_train_step(model, tx, *, loss: losses.LossConfig = losses.LossConfig(),
                    shared_batch: bool, mesh=None, inputs=None, member_loop: str = 'auto'):
  """jit(over_members(train_step)) over the member axis (vmap, or unrolled on a CPU; see
  `over_members`), donating the state: `step(state, batch)`.

  With `shared_batch`, every member trains on the same batch (batch leaves (B, ...));
  otherwise each on its own (batch leaves (K, B, ...)). The batch is the input pipeline's:
  `device_input.expand` gathers it from the resident data and applies its transforms inside
  the compiled step, once for all members of a shared batch; `inputs` are the device-side
  inputs that needs (`device_input.TrainInput.inputs`; made from the batch's image size when
  None). With a `mesh` (parallel.make_mesh), the state and batch keep their shardings on it
  and the metrics come back replicated.
  """
  step = functools.partial(train_step, model=model, tx=tx, loss=loss)
  fn, kw = over_members(step, (0, None if shared_batch else 0), member_loop), {}
  if mesh is not None:
    state_sh, replicated = parallel.state_sharding(mesh), parallel.replicated(mesh)
    fn = parallel.shard_members(fn, mesh, shared_batch)
    kw = dict(in_shardings=(state_sh, parallel.batch_sharding(mesh, shared_batch), replicated),
              out_shardings=(state_sh, replicated))
  full = lambda state, batch, given: fn(state, device_input.expand(batch, given))
  return device_input.BoundStep(jax.jit(full, donate_argnums=0, **kw), inputs, mesh)


def seg_counts(lesion_prob: Array, masks: Array, threshold: float = 0.5) -> Array:
  """Per-image (tp, fp, fn, tn) of the mask `lesion_prob >= threshold` against `masks`, both
  (N, H, W): (N, 4) int32, what metrics.segmentation_scores takes."""
  pred = lesion_prob >= threshold
  truth = masks > 0
  count = lambda a: jnp.sum(a, axis=(1, 2), dtype=jnp.int32)
  return jnp.stack([count(pred & truth), count(pred & ~truth), count(~pred & truth),
                    count(~pred & ~truth)], axis=-1)


def member_predictions(state: TrainState, images: Array, *, model,
                       member_loop: str = 'auto') -> dict[str, Array]:
  """`predict` of every member: leaves with a leading member axis (see `over_members`)."""
  one = lambda p, bs: predict({'params': p, 'batch_stats': bs}, images, model=model)
  return over_members(one, (0, 0), member_loop)(state.params, state.batch_stats)


def ensemble_predictions(state: TrainState, images: Array, *, model) -> dict[str, Array]:
  """`predict` of a seed ensemble: the members' probabilities averaged (one member: its own)."""
  return jax.tree.map(lambda x: x.mean(0), member_predictions(state, images, model=model))


def eval_step(state: TrainState, batch: dict[str, Array], *, model,
              threshold: float = 0.5) -> dict[str, Array]:
  """Per-image outputs for evaluation, for every member and for their ensemble.

  Returns, depending on the model's tasks:
    'seg_counts' (K, batch, 4) int32 (tp, fp, fn, tn) of each member's mask at `threshold`,
    'ensemble_seg_counts' (batch, 4) of the mask of the members' averaged lesion probability,
    'melanoma_prob' (K, batch) and 'ensemble_melanoma_prob' (batch,), the members' average.
  """
  out = member_predictions(state, batch['image'], model=model)
  result = {}
  if 'lesion_prob' in out:
    result['seg_counts'] = jax.vmap(lambda p: seg_counts(p, batch['mask'], threshold))(
        out['lesion_prob'])
    result['ensemble_seg_counts'] = seg_counts(jnp.mean(out['lesion_prob'], axis=0),
                                                batch['mask'], threshold)
  if 'melanoma_prob' in out:
    result['melanoma_prob'] = out['melanoma_prob']
    result['ensemble_melanoma_prob'] = jnp.mean(out['melanoma_prob'], axis=0)
  return result


# ------------------------------------------------- the gradient study (skinmtl_jax/grad_study.py)

# What `study` reports per parameter group (see skinmtl_jax/grad_study.py for their meaning).
STUDY_QUANTITIES = ('seg_norm', 'cls_norm', 'ratio', 'cosine', 'conflict', 'reverse_norm',
                    'head_norm', 'reverse_head_cosine', 'gate_mean', 'gate_min', 'gate_max')
_STUDY_AGGREGATES = {'encoder': lambda n: n.startswith('encoder/'),
                     'decoder': lambda n: n.startswith('decoder'),
                     'classifier': lambda n: n.startswith('classifier/'), 'all': lambda n: True}


def _study_ratio(stats: dict[str, Array]) -> dict[str, Array]:
  seg, cls = stats.pop('a_norm'), stats.pop('b_norm')
  return {'seg_norm': seg, 'cls_norm': cls,
          'ratio': jnp.where(cls > 0, seg / jnp.maximum(cls, 1e-30), jnp.nan), **stats}


def study(params, batch_stats, batch: dict[str, Array], *, model,
          loss: losses.LossConfig = losses.LossConfig()) -> dict[str, dict[str, Array]]:
  """The study of one model (no member axis) on `batch`, in training mode (batch statistics,
  as the training step sees it). Returns {group: {quantity: scalar}}: the quantities of
  STUDY_QUANTITIES, defined in skinmtl_jax/grad_study.py's docstring.
  """
  images = to_float_images(batch['image'])
  variables = {'params': params, 'batch_stats': batch_stats}
  # Zero perturbations of the gated decoder inputs: their gradient is the activations' gradient.
  shapes = jax.eval_shape(
      lambda: model.apply(variables, images, train=True,
                          mutable=['batch_stats', 'perturbations'])[1].get('perturbations', {}))
  perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def terms_fn(p, m=model, stop_head=False):
    outputs, new_vars = m.apply({**p, 'batch_stats': batch_stats}, images, train=True,
                                mutable=['batch_stats', 'intermediates'])
    if stop_head and 'cls_logits' in outputs:
      outputs = {**outputs, 'cls_logits': jax.lax.stop_gradient(outputs['cls_logits'])}
    terms = losses.loss_terms(outputs, batch, dice_smooth=loss.dice_smooth)
    return terms, new_vars.get('intermediates', {})

  weights = loss.weights
  by_task, _, intermediates = gradients.task_gradients(
      terms_fn, {'params': params, 'perturbations': perturbations}, weights)
  # A single-task model has one task gradient; the other is zero.
  zeros = jax.tree.map(jnp.zeros_like, next(iter(by_task.values())))
  seg, cls = by_task.get('seg', zeros), by_task.get('cls', zeros)

  out = {g: _study_ratio(s) for g, s in
         gradients.pair_statistics(seg['params'], cls['params'],
                                   aggregates=_STUDY_AGGREGATES).items()}

  gated = gradients.pair_statistics(seg['perturbations'], cls['perturbations'],
                                    group=lambda n: 'gated/' + n.split('/')[0])
  gates = {}
  for path, values in jax.tree_util.tree_flatten_with_path(
      intermediates, is_leaf=lambda x: isinstance(x, tuple))[0]:
    name = gradients.path_name(path)
    if name.endswith('/gate'):
      g = values[0]
      gates['gated/' + name.split('/')[0]] = {
          'gate_mean': jnp.mean(g), 'gate_min': jnp.min(g), 'gate_max': jnp.max(g)}
  for g, s in gated.items():
    out[g] = {**_study_ratio(s), **gates.get(g, {})}

  if getattr(model, 'reverse', False):
    def total(p, m, stop_head):
      return losses.weighted_loss(terms_fn({'params': p}, m, stop_head)[0], weights)

    through_reverse = jax.grad(total)(params, model, True)
    through_head = jax.grad(total)(params, model.clone(reverse_stop_gradient=True), False)
    # Only the classifier's layers: elsewhere "stopping the head" leaves the segmentation
    # loss's own direct path, which is not the reverse connection.
    paths = gradients.pair_statistics(through_reverse, through_head, aggregates={
        'classifier': lambda n: n.startswith('classifier/')})
    for g, s in paths.items():
      if not g.startswith('classifier'):
        continue
      out[g].update({'reverse_norm': s['a_norm'], 'head_norm': s['b_norm'],
                     'reverse_head_cosine': s['cosine']})
  return out


def make_study_step(model, *, loss: losses.LossConfig = losses.LossConfig(),
                    shared_batch: bool, mesh=None, inputs=None, member_loop: str = 'auto'):
  """jit(over_members(study)) over the member axis of a stacked TrainState, on the pipeline's
  batches with their device-side `inputs` (see steps.make_train_step); with a `mesh`, the
  results come back replicated."""
  fn = functools.partial(study, model=model, loss=loss)
  per_member = lambda state, batch: over_members(
      fn, (0, 0, None if shared_batch else 0), member_loop)(state.params, state.batch_stats,
                                                             batch)
  kw = {}
  if mesh is not None:
    per_member = parallel.shard_members(per_member, mesh, shared_batch)
    kw['out_shardings'] = parallel.replicated(mesh)
  full = lambda state, batch, given: per_member(state, device_input.expand(batch, given))
  return device_input.BoundStep(jax.jit(full, **kw), inputs, mesh)
