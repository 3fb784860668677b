"""ResNet-50 (v1.5, He et al. 2016) for the classification-only baseline, trained from scratch.

The paper's baseline used a ResNet-50; no pretrained weights can be downloaded here, so ours
starts from random initialisation (say so when comparing with the paper's 78.26 % F1). Its
pooled features go through the same classification sub-module as the multi-task models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from skinmtl_jax.models.mtl import Classifier
from skinmtl_jax.models.unet import BN_EPSILON, BN_MOMENTUM

Array = Any


class Bottleneck(nn.Module):
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    norm = lambda name, **kw: nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                                           epsilon=BN_EPSILON, dtype=self.dtype, name=name, **kw)
    conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), padding='SAME', use_bias=False,
                                         dtype=self.dtype, name=name)
    y = nn.relu(norm('bn1')(conv(self.features, 1, 1, 'conv1')(x)))
    y = nn.relu(norm('bn2')(conv(self.features, 3, self.strides, 'conv2')(y)))
    # Zero-initialised last BN scale: each block starts as identity, which trains stably.
    y = norm('bn3', scale_init=nn.initializers.zeros)(conv(self.features * 4, 1, 1, 'conv3')(y))
    if x.shape[-1] != y.shape[-1] or self.strides != 1:
      x = norm('proj_bn')(conv(self.features * 4, 1, self.strides, 'proj')(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 classifier. Returns {'cls_logits'}."""

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  cls_hidden: int = 128
  k_features: Sequence[int] = (64, 32)
  num_cls_classes: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                dtype=self.dtype, name='stem')(x.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, name='stem_bn')(x)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding='SAME')
    for i, n in enumerate(self.stage_sizes):
      for b in range(n):
        x = Bottleneck(self.width * 2 ** i, 2 if (b == 0 and i > 0) else 1, self.dtype,
                       name=f'stage{i + 1}_block{b + 1}')(x, train)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits, _ = Classifier(self.cls_hidden, tuple(self.k_features), self.num_cls_classes,
                           name='classifier')([pooled])
    return {'cls_logits': logits}
