"""Explicit certified CNNs with BatchNorm: CNN-7 (Fast-IBP) and CNN-BN of any depth."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cerdeq_jax.models.blocks import ConvBNReLU, DenseHead


class CNN(nn.Module):
  """Stack of conv-BN-ReLU layers then a dense head.

  ``channels[i]`` and ``strides[i]`` give layer i. CNN-7 (Shi et al. 2021) is
  ``channels=(64, 64, 128, 128, 128)``, ``strides=(1, 1, 2, 1, 1)``, dense 512.
  """
  num_classes: int
  channels: Sequence[int] = (64, 64, 128, 128, 128)
  strides: Sequence[int] = (1, 1, 2, 1, 1)
  hidden: Sequence[int] = (512,)
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None):
    if len(self.channels) != len(self.strides):
      raise ValueError('CNN: channels and strides differ in length.')
    for c, s in zip(self.channels, self.strides):
      x = ConvBNReLU(c, strides=(s, s), batch_norm=self.batch_norm)(x, train)
    return DenseHead(self.num_classes, self.hidden, self.batch_norm)(x, train, labels)


def cnn7(num_classes: int, width: int = 64, dense: int = 512, extra_downsample: bool = False,
         batch_norm: bool = True):
  """CNN-7 with BN; ``width`` scales the channels (64 in the paper);
  ``extra_downsample`` adds the second stride-2 conv used for 64x64 inputs."""
  channels = (width, width, 2 * width, 2 * width, 2 * width)
  strides = (1, 1, 2, 2 if extra_downsample else 1, 1)
  return CNN(num_classes, channels, strides, (dense,), batch_norm)


def cnn_depth(num_classes: int, depth: int, width: int = 64, dense: int = 512,
              batch_norm: bool = True):
  """CNN-BN with ``depth`` conv layers (the paper's depth figure): the first
  third of the layers at ``width`` channels, one stride-2 layer, the rest at
  ``2 * width``; depth >= 2."""
  if depth < 2:
    raise ValueError(f'cnn_depth needs depth >= 2, got {depth}.')
  first = max(1, depth // 3)
  channels = tuple([width] * first + [2 * width] * (depth - first))
  strides = tuple([1] * first + [2] + [1] * (depth - first - 1))
  return CNN(num_classes, channels, strides, (dense,), batch_norm)
