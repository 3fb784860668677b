"""The network family: parameter counts, shapes, shared leaves, gradient paths."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from skinmtl_jax import losses, models, steps

PAPER_SIZE = (192, 256)


def count_params(model, size=PAPER_SIZE):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *size, 3))))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def paper_model(name):
  import importlib
  return models.create_model(importlib.import_module(f'configs.{name}').get_config().model)


def test_unet_has_the_papers_parameter_count():
  n = count_params(paper_model('unet'))
  assert abs(n - 10.71e6) / 10.71e6 < 0.01, n
  assert n == 10_709_954  # exact value of this implementation; a change here is a design change


@pytest.mark.parametrize('name,paper_millions', [
    ('mtl0', 10.76), ('mtl1', 10.80), ('mtl2', 10.86), ('mtl3', 10.90), ('mtl4', 10.90)])
def test_mtl_parameter_counts_near_paper(name, paper_millions):
  unet = count_params(paper_model('unet'))
  n = count_params(paper_model(name))
  # The classifier adds 0.05-0.19 M: compare the increment over the U-Net, to 0.025 M.
  assert abs((n - unet) - (paper_millions - 10.71) * 1e6) < 0.025e6, (name, n)


def test_ladder_grows_monotonically():
  counts = [count_params(paper_model(n)) for n in ('unet', 'mtl0', 'mtl1', 'mtl2', 'mtl3')]
  assert counts == sorted(counts) and len(set(counts)) == 5


def test_resnet50_parameter_count():
  n = count_params(paper_model('resnet50'))
  assert abs(n - 23.84e6) / 23.84e6 < 0.01, n


@pytest.mark.parametrize('name', ['unet', 'mtl0', 'mtl1', 'mtl2', 'mtl3', 'resnet50'])
def test_output_shapes(name):
  cfg = tiny_config(name)
  model = models.create_model(cfg.model)
  x = jnp.ones((3, 32, 32, 3))
  variables = steps.init_variables(model, jax.random.key(0), x)
  out = jax.jit(model.apply)(variables, x)
  if name != 'resnet50':
    assert out['seg_logits'].shape == (3, 32, 32, 2)
  else:
    assert 'seg_logits' not in out
  if name != 'unet':
    assert out['cls_logits'].shape == (3, 2)
  else:
    assert 'cls_logits' not in out


def _mtl2(**overrides):
  cfg = tiny_config('mtl2')
  cfg.model.update(overrides)
  model = models.create_model(cfg.model)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  return model, steps.init_variables(model, jax.random.key(0), x), x


def test_reverse_learning_adds_no_decoder_parameters():
  # mtl2 = mtl1 + one more encoder source in the classifier; the recomputed decoder levels
  # must not bring parameters of their own.
  m1 = models.create_model(tiny_config('mtl1').model)
  m2, v2, x = _mtl2()
  v1 = steps.init_variables(m1, jax.random.key(0), x)
  def size(tree):
    return sum(a.size for a in jax.tree.leaves(tree))
  assert size(v2['params']['encoder']) == size(v1['params']['encoder'])
  for k in v1['params']:
    if k.startswith('decoder') or k == 'seg_head':
      assert jax.tree.map(jnp.shape, v1['params'][k]) == jax.tree.map(jnp.shape, v2['params'][k])
  assert sorted(k for k in v2['params'] if k.startswith('decoder')) == \
      sorted(k for k in v1['params'] if k.startswith('decoder'))


def test_both_decoder_passes_read_the_same_leaves():
  # With FC_cls^k forced to exactly 1 the reverse pass must reproduce pass 1: it can only do
  # so if it runs the same parameters.
  model, variables, x = _mtl2()
  params = jax.tree.map(lambda a: a, variables['params'])
  for j in (0, 1):
    layer = params['classifier'][f'fc_k{j}']
    layer['kernel'] = jnp.zeros_like(layer['kernel'])
    layer['bias'] = jnp.full_like(layer['bias'], 100.0)  # sigmoid(100) == 1 in float32
  out, inter = model.apply({**variables, 'params': params}, x, mutable=['intermediates'])
  pass1 = inter['intermediates']['seg_logits_pass1'][0]
  np.testing.assert_allclose(out['seg_logits'], pass1, rtol=1e-6, atol=1e-6)
  # And with ordinary gates the two passes differ (the reverse connection does something).
  out, inter = model.apply(variables, x, mutable=['intermediates'])
  assert not np.allclose(out['seg_logits'], inter['intermediates']['seg_logits_pass1'][0])


def _seg_loss_grad_into_k_layers(**overrides):
  model, variables, x = _mtl2(**overrides)
  masks = (x[..., 0] > 0.5).astype(jnp.float32)

  def seg_loss(params):
    out = model.apply({**variables, 'params': params}, x)
    return losses.soft_dice_loss(out['seg_logits'], masks)

  g = jax.grad(seg_loss)(variables['params'])['classifier']
  return [float(jnp.abs(g[f'fc_k{j}']['kernel']).sum() + jnp.abs(g[f'fc_k{j}']['bias']).sum())
          for j in (0, 1)]


def test_params_mode_sends_segmentation_gradient_into_classifier():
  grads = _seg_loss_grad_into_k_layers(reverse_mode='params')
  assert all(g > 0 for g in grads), grads


def test_stop_gradient_cuts_the_reverse_path_exactly():
  grads = _seg_loss_grad_into_k_layers(reverse_mode='params', reverse_stop_gradient=True)
  assert grads == [0.0, 0.0]


def test_activations_mode_gates_depend_on_the_image():
  model, variables, x = _mtl2(reverse_mode='activations')
  other = jax.random.uniform(jax.random.key(7), x.shape[1:])
  out_a = model.apply(variables, x)
  out_b = model.apply(variables, x.at[1].set(other))
  # Per-image gates (eval mode): changing image 1 leaves image 0's outputs as they were; gates
  # pooled over the batch would carry image 1 into image 0.
  np.testing.assert_allclose(out_a['seg_logits'][0], out_b['seg_logits'][0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out_a['seg_logits'][1], out_b['seg_logits'][1])
  # ... and the gates do act: 'params' mode (one gate for every image) gives other outputs.
  params_model = models.create_model(tiny_config('mtl2').model)
  out_p = params_model.apply(variables, x)
  assert not np.allclose(out_a['seg_logits'], out_p['seg_logits'], atol=1e-4)
  assert _seg_loss_grad_into_k_layers(reverse_mode='activations')[1] > 0


def test_reverse_without_classifier_is_rejected():
  cfg = tiny_config('mtl2')
  cfg.model.classify = False
  model = models.create_model(cfg.model)
  with pytest.raises(ValueError, match='model.reverse'):
    model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))


def test_input_size_must_fit_the_levels():
  model = models.create_model(tiny_config('mtl0').model)
  with pytest.raises(ValueError, match='divisible by 8'):
    model.init(jax.random.key(0), jnp.ones((1, 36, 32, 3)))


def test_running_statistics_fit_both_decoder_passes():
  # With the parameters fixed, repeated training-mode passes over one batch must drive the
  # running statistics to that batch's statistics, so that evaluation-mode outputs equal
  # training-mode outputs. Statistics shared by the two passes of reverse learning would blend
  # two distributions and fail this.
  model, variables, x = _mtl2()
  assert 'mean_pass2' in variables['batch_stats']['decoder1']['block1']['bn']
  assert 'mean_pass2' not in variables['batch_stats']['decoder3']['block1']['bn']

  @jax.jit
  def update(stats):
    _, new = model.apply({'params': variables['params'], 'batch_stats': stats}, x, train=True,
                         mutable=['batch_stats'])
    return new['batch_stats']

  stats = variables['batch_stats']
  for _ in range(150):
    stats = update(stats)
  train_out, _ = model.apply({'params': variables['params'], 'batch_stats': stats}, x,
                             train=True, mutable=['batch_stats'])
  eval_out = model.apply({'params': variables['params'], 'batch_stats': stats}, x, train=False)
  np.testing.assert_allclose(eval_out['seg_logits'], train_out['seg_logits'], atol=2e-3)


def test_batchnorm_matches_flax():
  import flax.linen as nn
  from skinmtl_jax.models.unet import BN_EPSILON, BN_MOMENTUM, BatchNorm
  x = jax.random.normal(jax.random.key(0), (4, 5, 6, 7)) * 3 + 1
  ours, ref = BatchNorm(), nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON)
  v = ours.init(jax.random.key(1), x, True)
  vr = ref.init(jax.random.key(1), x, use_running_average=False)
  assert jax.tree.structure(v) == jax.tree.structure(vr)
  y, s = ours.apply(v, x, True, mutable=['batch_stats'])
  yr, sr = ref.apply(vr, x, use_running_average=False, mutable=['batch_stats'])
  np.testing.assert_allclose(y, yr, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(sr)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.apply({'params': v['params'], **s}, x, False),
                             ref.apply({'params': vr['params'], **sr}, x, use_running_average=True),
                             atol=1e-5)


def test_batchnorm_in_bfloat16_rounds_once():
  """Mixed precision: BatchNorm computes in float32 and rounds its result once. Its two
  terms, x * mul and bias - mean * mul, are each about mean/std times the result: computed in
  bfloat16 (as before) their rounding was as large as the result."""
  from skinmtl_jax.models.unet import BatchNorm  # pylint: disable=import-outside-toplevel
  x = (50.0 + jax.random.normal(jax.random.key(0), (4, 8, 8, 16))).astype(jnp.bfloat16)
  x32 = x.astype(jnp.float32)  # the same values
  variables = BatchNorm().init(jax.random.key(1), x32, True)
  for train in (True, False):
    if not train:  # running statistics of these maps
      variables = {**variables, 'batch_stats': {'mean': jnp.mean(x32, (0, 1, 2)),
                                                'var': jnp.var(x32, (0, 1, 2))}}
    y32, _ = BatchNorm().apply(variables, x32, train, mutable=['batch_stats'])
    y16, _ = BatchNorm(dtype=jnp.bfloat16).apply(variables, x, train, mutable=['batch_stats'])
    assert y16.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(y16.astype(jnp.float32)) - np.asarray(y32)))
    assert err <= 2.0 ** -8 * np.max(np.abs(np.asarray(y32))), err  # one rounding


@pytest.mark.parametrize('conv_impl', ['auto', 'xla'])
def test_bfloat16_compute_keeps_float32_parameters_and_outputs(conv_impl):
  """Both paths: our CPU kernels ('auto': on the float32 values of the bfloat16 operands, or on
  AMX) and XLA's bfloat16 convolutions."""
  cfg = tiny_config('mtl3')
  cfg.model.dtype = 'bfloat16'
  cfg.model.conv_impl = conv_impl
  model = models.create_model(cfg.model)
  x = jnp.ones((2, 32, 32, 3))
  variables = steps.init_variables(model, jax.random.key(0), x)
  assert {a.dtype for a in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}
  out = jax.jit(model.apply)(variables, x)
  assert out['seg_logits'].dtype == out['cls_logits'].dtype == jnp.float32
  # The convolutions really run in bfloat16 (outputs are cast back, so look at the program),
  # and the results differ from float32's by bfloat16's round-off, not more.
  if conv_impl == 'xla':
    hlo = jax.jit(model.apply).lower(variables, x).as_text()
    assert re.search(r'stablehlo.convolution.*bf16', hlo)
  cfg.model.dtype = 'float32'
  out32 = jax.jit(models.create_model(cfg.model).apply)(variables, x)
  diff = np.max(np.abs(np.asarray(out['seg_logits']) - np.asarray(out32['seg_logits'])))
  assert 1e-5 < diff < 0.1, diff


@pytest.mark.parametrize('conv_impl', ['auto', 'xla'])
def test_upconv_is_flax_conv_transpose_with_the_same_parameters(conv_impl):
  """Both paths: our CPU kernels ('auto', where built) and the matmul ('xla')."""
  from skinmtl_jax import kernels  # pylint: disable=import-outside-toplevel
  from skinmtl_jax.models import conv  # pylint: disable=import-outside-toplevel
  from skinmtl_jax.models.unet import UpConv2x2  # pylint: disable=import-outside-toplevel
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(1), (2, 3, 5, 6))
  ours = UpConv2x2(4, conv_general_dilated=conv.select(conv_impl))
  ref = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
  v_ours, v_ref = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
  # Same names, shapes and initial values: checkpoints of either load into the other.
  assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_ref)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_ref)):
    np.testing.assert_array_equal(a, b)
  v = {'params': {'kernel': jax.random.normal(jax.random.key(2), (2, 2, 6, 4)),
                  'bias': jnp.arange(4.0)}}
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), atol=1e-5)
  loss = lambda m: lambda vv, xx: jnp.sum(jnp.sin(m.apply(vv, xx)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  hlo = jax.jit(jax.grad(loss(ours), argnums=(0, 1))).lower(v, x).as_text()
  uses = conv_impl == 'auto' and kernels.available()
  for target in (kernels.CONV, kernels.WEIGHT_GRAD):  # the gradients'; the forward is a matmul
    assert (f'@{target}(' in hlo) == uses, target
