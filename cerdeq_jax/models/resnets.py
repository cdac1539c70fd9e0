"""WideResNet-BN and ResNeXt-BN for certified training (small, IBP-friendly
variants in the spirit of the Fast-IBP recipe: few blocks, BN after every conv,
residual branches initialised at half scale)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cerdeq_jax import layers, parametrize
from cerdeq_jax.models.blocks import ConvBNReLU, DenseHead


class ResidualBlock(nn.Module):
  """conv-BN-ReLU -> conv-BN (+ projection shortcut) -> add -> ReLU.
  With ``groups > 1`` and ``bottleneck`` the ResNeXt block 1x1 -> grouped 3x3 -> 1x1."""
  features: int
  strides: int = 1
  groups: int = 1
  bottleneck: int | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = (x.lower if isinstance(x, layers.Interval) else x).shape[-1]
    if self.bottleneck:
      y = ConvBNReLU(self.bottleneck, (1, 1))(x, train)
      y = ConvBNReLU(self.bottleneck, (3, 3), (self.strides,) * 2,
                     feature_group_count=self.groups)(y, train)
      last_kernel = (1, 1)
    else:
      y = ConvBNReLU(self.features, (3, 3), (self.strides,) * 2)(x, train)
      last_kernel = (3, 3)
    y = layers.Conv(self.features, last_kernel,
                    kernel_init=parametrize.fast_ibp_init(residual=True))(y)
    y = layers.BatchNorm(use_running_average=not train)(y)
    if self.strides != 1 or c_in != self.features:
      x = layers.Conv(self.features, (1, 1), (self.strides,) * 2,
                      kernel_init=parametrize.fast_ibp_init(residual=True), name='shortcut')(x)
      x = layers.BatchNorm(use_running_average=not train)(x)
    return layers.ReLU()(layers.add(x, y))


class ResNet(nn.Module):
  """stem conv -> groups of residual blocks -> dense head."""
  num_classes: int
  stem: int = 16
  stages: Sequence[tuple[int, int]] = ((32, 1), (64, 2))  # (features, stride) per block
  groups: int = 1
  bottleneck_ratio: float | None = None
  hidden: Sequence[int] = (512,)

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None):
    x = ConvBNReLU(self.stem)(x, train)
    for features, stride in self.stages:
      bottleneck = int(features * self.bottleneck_ratio) if self.bottleneck_ratio else None
      x = ResidualBlock(features, stride, self.groups, bottleneck)(x, train)
    return DenseHead(self.num_classes, self.hidden)(x, train, labels)


def wide_resnet(num_classes: int, width: int = 8, extra_downsample: bool = False):
  """WideResNet-BN: stem 16, then blocks of 16w and 32w (stride 2), widen factor w."""
  stages = ((16 * width // 2, 1), (32 * width // 2, 2))
  if extra_downsample:
    stages = stages + ((32 * width // 2, 2),)
  return ResNet(num_classes, 16, stages)


def resnext(num_classes: int, width: int = 64, groups: int = 4, extra_downsample: bool = False):
  """ResNeXt-BN: grouped 3x3 bottleneck blocks (cardinality ``groups``)."""
  stages = ((width, 1), (2 * width, 2), (2 * width, 1))
  if extra_downsample:
    stages = stages + ((2 * width, 2),)
  return ResNet(num_classes, 16, stages, groups=groups, bottleneck_ratio=0.5)
