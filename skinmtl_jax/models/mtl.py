"""The multi-task network: shared U-Net encoder, segmentation decoder, classification sub-module.

One model covers the paper's whole ablation ladder (Table 3) through switches, so that every
rung shares the same code and parameter names:

  unet  segment only (`classify=False`).
  mtl0  + classifier on the globally pooled bottleneck.
  mtl1  + `attention_pool`: features of the decoder's last two levels, multiplied by the
        predicted lesion probability, pooled into the classifier.
  mtl2  + `reverse` (joint reverse learning, Eq. 2): the last two decoder levels run twice
        with the same parameters; pass 1 feeds the classifier, pass 2 has its input feature
        maps scaled channel-wise by FC_cls^k and gives the final segmentation. Also
        `encoder_pool_levels=2`: the last two encoder levels feed the classifier.
  mtl3  + `cbam` on those encoder levels before they are pooled.

FC_cls^k (the paper leaves it open) has two readings, chosen by `reverse_mode`:

  'params'       sigmoid(column mean of the k-unit FC kernel + its bias): a k-vector made of
                 the classifier's own parameters, so the segmentation loss trains them too.
                 This is the literal reading of "the weights of the FC layers" and the default.
  'activations'  sigmoid of that layer's pre-activation for the image: an image-dependent
                 channel attention.

`reverse_stop_gradient` cuts the gradient through the reverse path (for the gradient study).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skinmtl_jax.config_base import REVERSE_MODES
from skinmtl_jax.models import conv
from skinmtl_jax.models.unet import DecoderLevel, Encoder, SegHead

Array = Any



class CBAM(nn.Module):
  """Convolutional Block Attention Module (Woo et al. 2018): channel, then spatial attention."""

  reduction: int = 8
  spatial_kernel: int = 7

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    mlp_in = nn.Dense(max(c // self.reduction, 1), name='mlp_in')
    mlp_out = nn.Dense(c, name='mlp_out')
    mlp = lambda v: mlp_out(nn.relu(mlp_in(v)))
    channel = nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
    x = x * channel[:, None, None, :].astype(x.dtype)
    pooled = jnp.concatenate(
        [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1)
    k = self.spatial_kernel
    spatial = nn.sigmoid(nn.Conv(1, (k, k), padding='SAME', name='spatial')(pooled))
    return x * spatial.astype(x.dtype)


class Classifier(nn.Module):
  """The classification sub-module.

  Each pooled source gets its own `hidden`-unit projection; their concatenation goes through
  the FC_cls^k layers (k = `k_features`, the widths of the decoder's last two levels) and a
  final layer to `num_classes`.

  Returns:
    (logits, gates): gates[j] is FC_cls^k for k = k_features[j], shape (k,) in 'params' mode
    and (batch, k) in 'activations' mode.
  """

  hidden: int
  k_features: Sequence[int]
  num_classes: int = 2
  reverse_mode: str = 'params'

  @nn.compact
  def __call__(self, sources: Sequence[Array]) -> tuple[Array, list[Array]]:
    h = jnp.concatenate(
        [nn.relu(nn.Dense(self.hidden, name=f'proj{i}')(s.astype(jnp.float32)))
         for i, s in enumerate(sources)], axis=-1)
    gates = []
    for j, k in enumerate(self.k_features):
      layer = nn.Dense(k, name=f'fc_k{j}')
      pre = layer(h)
      if self.reverse_mode == 'params':
        p = layer.variables['params']
        gates.append(nn.sigmoid(jnp.mean(p['kernel'], axis=0) + p['bias']))
      else:
        gates.append(nn.sigmoid(pre))
      h = nn.relu(pre)
    return nn.Dense(self.num_classes, name='out')(h), gates


def _global_pool(x: Array) -> Array:
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class SkinMTL(nn.Module):
  """U-Net with an optional classification sub-module; see the module docstring."""

  features: Sequence[int] = (32, 64, 128, 256, 320, 320)
  classify: bool = True
  cls_hidden: int = 128
  attention_pool: bool = False
  reverse: bool = False
  reverse_mode: str = 'params'
  reverse_stop_gradient: bool = False
  encoder_pool_levels: int = 1
  cbam: bool = False
  cbam_reduction: int = 8
  num_seg_classes: int = 2
  num_cls_classes: int = 2
  dtype: Any = jnp.float32
  # The U-Net's convolution, chosen where the model is created (models.create_model, by
  # model.conv_impl: skinmtl_jax/models/conv.py). By default XLA's.
  conv_general_dilated: Callable = conv.xla_conv_general_dilated

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    """Args: x, images (batch, H, W, 3) in [0, 1]. Returns {'seg_logits'[, 'cls_logits']}."""
    if self.reverse and not self.classify:
      raise ValueError('model.reverse needs model.classify: reverse learning feeds the '
                       'classifier FC_cls^k back into the decoder.')
    if self.reverse_mode not in REVERSE_MODES:
      raise ValueError(f'model.reverse_mode={self.reverse_mode!r}; expected one of {REVERSE_MODES}.')
    feats = tuple(self.features)
    if len(feats) < 3:
      raise ValueError(f'model.features={feats}: need at least 3 levels.')
    factor = 2 ** (len(feats) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'Input size {x.shape[1:3]} must be divisible by {factor} '
                       f'for {len(feats)} levels (set data.image_size accordingly).')

    convolution = self.conv_general_dilated
    skips = Encoder(feats, self.dtype, convolution, name='encoder')(
        x.astype(self.dtype), train)
    # Decoder levels from deep to shallow; level j reads skip skips[-2 - j].
    levels = [DecoderLevel(f, self.dtype, convolution, name=f'decoder{i + 1}')
              for i, f in reversed(list(enumerate(feats[:-1])))]
    seg_head = SegHead(self.num_seg_classes, self.dtype, convolution, name='seg_head')
    h = skips[-1]
    for j, level in enumerate(levels[:-2]):
      h = level(h, skips[-2 - j], train)
    trunk, first_tail = h, len(levels) - 2

    def tail(gates):
      # The last two decoder levels and the head. Calling the same submodules again reuses
      # their parameters: the two passes of reverse learning share every leaf.
      y, outs = trunk, []
      for j in range(first_tail, len(levels)):
        g = None if gates is None else gates[j - first_tail]
        y = levels[j](y, skips[-2 - j], train, gate=g)
        outs.append(y)
      return outs, seg_head(y)

    tail_feats, seg = tail(None)
    if not self.classify:
      return {'seg_logits': seg}

    encoder_sources = skips[-self.encoder_pool_levels:][::-1]
    if self.cbam:
      encoder_sources = [CBAM(self.cbam_reduction, name=f'cbam{i}')(s)
                         for i, s in enumerate(encoder_sources)]
    sources = [_global_pool(s) for s in encoder_sources]
    if self.attention_pool:
      lesion = jax.nn.softmax(seg, axis=-1)[..., 1:]
      for f in tail_feats:
        r = lesion.shape[1] // f.shape[1]
        p = nn.avg_pool(lesion, (r, r), strides=(r, r)) if r > 1 else lesion
        sources.append(_global_pool(f * p.astype(f.dtype)))
    # FC_cls^k for k = widths of the last two decoder levels (deepest first).
    cls_logits, gates = Classifier(self.cls_hidden, (feats[1], feats[0]), self.num_cls_classes,
                                   self.reverse_mode, name='classifier')(sources)
    if self.reverse:
      if self.reverse_stop_gradient:
        gates = [jax.lax.stop_gradient(g) for g in gates]
      self.sow('intermediates', 'seg_logits_pass1', seg)
      _, seg = tail(gates)
    return {'seg_logits': seg, 'cls_logits': cls_logits.astype(jnp.float32)}
