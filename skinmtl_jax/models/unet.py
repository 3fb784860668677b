"""The nnU-Net 2D U-Net backbone (paper §3.4.1): encoder stages and decoder levels.

Each stage is two 3x3 conv -> BatchNorm -> ReLU blocks. The first conv of every encoder stage
but the first has stride 2 (strided convolutions replace pooling, as in nnU-Net). A decoder level
is a 2x2 stride-2 transposed conv, a concatenation with the encoder skip, and two conv blocks.
Convolutions keep their bias, as nnU-Net's do; that is what gives the paper's 10.71 M parameters.

Batch normalisation keeps its running statistics per decoder pass: reverse learning runs the
last two decoder levels twice, and the second pass sees gated (smaller) activations. Shared
running statistics would blend the two distributions and fit neither at evaluation time (test
Dice falls well below what batch statistics give: docs/decisions.md). The scale and bias parameters are shared, so both passes still use the same leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from skinmtl_jax.models import conv

Array = Any

# BatchNorm settings of nnU-Net / PyTorch (momentum 0.1 there is 0.9 here, flax's convention).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class BatchNorm(nn.Module):
  """Batch normalisation with shared scale/bias and one set of running statistics per `stats`.

  With `stats=''` it is flax's BatchNorm (same variable names, same arithmetic); a decoder
  level's second pass uses `stats='pass2'` (see the module docstring).
  """

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, stats: str = '') -> Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    suffix = f'_{stats}' if stats else ''
    ra_mean = self.variable('batch_stats', 'mean' + suffix, jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var' + suffix, jnp.ones, (c,), jnp.float32)
    if train:
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axis=(0, 1, 2))
      var = jnp.maximum(jnp.mean(jnp.square(xf), axis=(0, 1, 2)) - jnp.square(mean), 0.0)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    # In float32 whatever the compute dtype, rounded once at the end: in bfloat16 the two terms
    # (each about mean/std times the result) cancelled, and their rounding swamped the result.
    return (x.astype(jnp.float32) * mul + (bias - mean * mul)).astype(self.dtype)


class ConvBlock(nn.Module):
  """3x3 conv -> BatchNorm -> ReLU."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  # The convolution, chosen where the model is created (skinmtl_jax/models/conv.py: select).
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array, train: bool, stats: str = '') -> Array:
    x = nn.Conv(self.features, (3, 3), strides=(self.strides, self.strides),
                padding='SAME', dtype=self.dtype, name='conv',
                promote_dtype=conv.promote_keep_params,
                conv_general_dilated=self.conv_general_dilated)(x)
    x = BatchNorm(dtype=self.dtype, name='bn')(x, train, stats)
    return nn.relu(x)


class EncoderStage(nn.Module):
  """Two conv blocks; the first strided for every stage but the first."""

  features: int
  strides: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    block = functools.partial(ConvBlock, dtype=self.dtype,
                              conv_general_dilated=self.conv_general_dilated)
    x = block(self.features, self.strides, name='block1')(x, train)
    return block(self.features, 1, name='block2')(x, train)


class Encoder(nn.Module):
  """The U-Net encoder. Returns the output of every stage, shallowest first."""

  features: Sequence[int]
  dtype: Any = jnp.float32
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array, train: bool) -> list[Array]:
    skips = []
    for i, f in enumerate(self.features):
      x = EncoderStage(f, 1 if i == 0 else 2, self.dtype, self.conv_general_dilated,
                       name=f'stage{i + 1}')(x, train)
      skips.append(x)
    return skips


class UpConv2x2(nn.Module):
  """`nn.ConvTranspose(features, (2, 2), strides=(2, 2))` by `conv_general_dilated`.

  Same parameter names, shapes and initialisers (kernel (2, 2, in, out) lecun_normal, bias
  zeros) and the same outputs. The 2x2 stride-2 windows do not overlap, so
  out[2i + a, 2j + c] = x[i, j] @ kernel[1 - a, 1 - c] + bias (lax.conv_transpose without
  transpose_kernel flips the kernel). The models' convolutions compute it as one matmul and a
  depth-to-space (`conv.upconv2x2`), with matmuls as its gradients (on CPUs our kernels),
  whereas flax's kernel gradient is a dilated convolution with a huge window that XLA's CPU
  backend runs many times slower (benchmarks/conv_variants.py, benchmarks/RESULTS.md).
  """

  features: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (2, 2, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    # The bias in float32, rounded with the sum: its gradient is then a float32 sum (see
    # conv.promote_keep_params).
    return (conv.upconv2x2(self.conv_general_dilated, x, kernel) + bias).astype(self.dtype)


class DecoderLevel(nn.Module):
  """Transposed conv up, concat with the skip, two conv blocks.

  `gate`, when given, is the reverse connection of paper Eq. 2: a per-channel factor (shape
  (k,) or (batch, k), k = `features`) that multiplies the level's input feature maps — the
  upsampled features and the skip, each of which has k channels — before the convolutions.
  """

  features: int
  dtype: Any = jnp.float32
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array, skip: Array, train: bool, gate: Array | None = None) -> Array:
    up = UpConv2x2(self.features, self.dtype, self.conv_general_dilated, name='upconv')(x)
    stats = ''
    if gate is not None:
      g = gate.reshape(gate.shape[:-1] + (1, 1, gate.shape[-1])) if gate.ndim == 2 else gate
      up, skip = up * g.astype(up.dtype), skip * g.astype(skip.dtype)
      stats = 'pass2'
    x = jnp.concatenate([up, skip], axis=-1)
    if gate is not None:
      # For the gradient study: the gate, and (when a 'perturbations' collection is passed)
      # the gradient at the channel-scaled feature maps. Both are no-ops in training.
      self.sow('intermediates', 'gate', gate)
      x = self.perturb('gated_input', x)
    block = functools.partial(ConvBlock, dtype=self.dtype,
                              conv_general_dilated=self.conv_general_dilated)
    x = block(self.features, 1, name='block1')(x, train, stats)
    return block(self.features, 1, name='block2')(x, train, stats)


class SegHead(nn.Module):
  """1x1 conv to the segmentation classes (softmax is applied by the loss / at inference)."""

  num_classes: int = 2
  dtype: Any = jnp.float32
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='conv',
                   promote_dtype=conv.promote_keep_params,
                   conv_general_dilated=self.conv_general_dilated)(x).astype(jnp.float32)
