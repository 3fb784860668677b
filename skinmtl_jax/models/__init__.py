"""Model construction from a config."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from skinmtl_jax.config_base import ARCHITECTURES
from skinmtl_jax.models import conv
from skinmtl_jax.models.mtl import CBAM, Classifier, SkinMTL
from skinmtl_jax.models.resnet import ResNet50


def create_model(cfg: ml_collections.ConfigDict):
  """Builds the flax module named by `cfg.arch` from the model config `cfg`. The U-Net's
  convolution is chosen here, once, for JAX's default backend (`conv.select`: our CPU kernels
  or XLA's, by `cfg.conv_impl`)."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.arch == 'resnet50':
    return ResNet50(width=cfg.resnet_width, cls_hidden=cfg.cls_hidden,
                    k_features=(cfg.features[1], cfg.features[0]), dtype=dtype)
  if cfg.arch == 'mtl':
    return SkinMTL(
        features=tuple(cfg.features), classify=cfg.classify, cls_hidden=cfg.cls_hidden,
        attention_pool=cfg.attention_pool, reverse=cfg.reverse, reverse_mode=cfg.reverse_mode,
        reverse_stop_gradient=cfg.reverse_stop_gradient,
        encoder_pool_levels=cfg.encoder_pool_levels, cbam=cfg.cbam,
        cbam_reduction=cfg.cbam_reduction, dtype=dtype,
        conv_general_dilated=conv.select(cfg.conv_impl, dtype))
  raise ValueError(f'model.arch={cfg.arch!r} is unknown; expected one of {ARCHITECTURES}.')


__all__ = ['CBAM', 'Classifier', 'ResNet50', 'SkinMTL', 'create_model']
