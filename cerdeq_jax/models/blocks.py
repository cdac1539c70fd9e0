"""Building blocks shared by the models (array or `Interval` in, same out)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cerdeq_jax import layers, parametrize


class ConvBNReLU(nn.Module):
  """conv (Fast-IBP init) -> BatchNorm (if ``batch_norm``) -> ReLU."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  feature_group_count: int = 1
  residual_init: bool = False
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.Conv(self.features, self.kernel_size, self.strides,
                    feature_group_count=self.feature_group_count,
                    kernel_init=parametrize.fast_ibp_init(residual=self.residual_init))(x)
    if self.batch_norm:
      x = layers.BatchNorm(use_running_average=not train)(x)
    return layers.ReLU()(x)


class DenseHead(nn.Module):
  """flatten -> dense (+BN+ReLU) ... -> elided classifier.

  Returns logits for arrays and margin lower bounds for intervals.
  """
  num_classes: int
  hidden: Sequence[int] = (512,)
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool, labels=None):
    x = layers.Flatten()(x)
    for width in self.hidden:
      x = layers.Dense(width, kernel_init=parametrize.fast_ibp_init())(x)
      if self.batch_norm:
        x = layers.BatchNorm(use_running_average=not train)(x)
      x = layers.ReLU()(x)
    return layers.ElidedDense(self.num_classes, name='classifier')(x, labels)
