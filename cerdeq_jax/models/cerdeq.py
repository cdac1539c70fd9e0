"""The CerDEQ classifier *(ours: the paper's exact layout is not public)*.

Layout, after IBP-MonDEQ (Wei & Kolter 2022), the published DEQ layout for
IBP: one certifiable DEQ layer first (its injection may downsample), BatchNorm,
then the CNN-7 tail (conv 2w/s2, conv 2w, conv 2w, dense 512, elided
classifier). Putting the DEQ first lets it play the role of the explicit
network's early layers, where IBP's bound growth starts; the tail is kept
identical to CNN-7 so that the DEQ-vs-CNN comparison changes one thing. The
same layout with ``parametrization.method`` 'wn' or 'sn' gives the DEQ+WN and
DEQ+SN ablations. ``parametrization.mode`` 'reparam' makes W a differentiable
function of a free parameter instead of projecting it after each step, and
``parametrization.bound`` 'rho' keeps the Perron-root bound rho(S) <= scale
instead of ||S||_2 <= scale (see `layers.DEQ`); the defaults ('project',
'spectral') are the paper's. ``batch_norm=False`` drops every BatchNorm
(classic IBP networks, whose bounds are far tighter at initialisation).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from cerdeq_jax import layers, parametrize, solvers
from cerdeq_jax.models.blocks import ConvBNReLU, DenseHead


class CerDEQ(nn.Module):
  num_classes: int
  width: int = 64
  tail_channels: Sequence[int] = (128, 128, 128)
  tail_strides: Sequence[int] = (2, 1, 1)
  hidden: Sequence[int] = (512,)
  injection_strides: Sequence[int] = (1, 1)
  parametrization: parametrize.Parametrization = parametrize.Parametrization('bjorck')
  solver: solvers.Solver = solvers.Anderson(tol=1e-4, max_iter=50)
  adjoint_solver: solvers.Solver | None = None
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None):
    x = layers.DEQ(self.width, injection_strides=self.injection_strides,
                   parametrization=self.parametrization, solver=self.solver,
                   adjoint_solver=self.adjoint_solver, name='deq')(x, strict=not train)
    if self.batch_norm:
      x = layers.BatchNorm(use_running_average=not train)(x)
    for c, s in zip(self.tail_channels, self.tail_strides):
      x = ConvBNReLU(c, strides=(s, s), batch_norm=self.batch_norm)(x, train)
    return DenseHead(self.num_classes, self.hidden, self.batch_norm)(x, train, labels)
