"""Certified classifiers built from `cerdeq_jax.layers`.

Every model is called as ``model(x, train, labels=None)``: logits ``(N, K)`` for
an array, margin lower bounds ``(N, K)`` for an `Interval` (with labels).
"""
from __future__ import annotations

from cerdeq_jax import parametrize, solvers
from cerdeq_jax.models.cerdeq import CerDEQ
from cerdeq_jax.models.cnn import CNN, cnn7, cnn_depth
from cerdeq_jax.models.linf_dist import LinfDistNet
from cerdeq_jax.models.resnets import ResNet, resnext, wide_resnet

MODEL_NAMES = ('cerdeq', 'deq_wn', 'deq_sn', 'cnn7', 'wide_resnet', 'resnext', 'cnn_depth',
               'linf_dist', 'linf_dist_mlp')
#: ℓ∞-dist Nets: trained with their own objective (`linf_training`), not IBP.
LINF_MODELS = ('linf_dist', 'linf_dist_mlp')
_DEQ_METHODS = {'cerdeq': 'bjorck', 'deq_wn': 'wn', 'deq_sn': 'sn'}


def create(name: str, num_classes: int, *, image_size: int = 32, width: int | None = None,
           depth: int | None = None, deq_scale: float = 0.95, solver: solvers.Solver | None = None,
           adjoint_solver: solvers.Solver | None = None, dense: int = 512,
           deq_stride: int | None = None, tail_strides: tuple[int, ...] | None = None,
           batch_norm: bool = True, deq_param_mode: str = 'project',
           deq_bound: str = 'spectral'):
  """Builds a model by name (see `MODEL_NAMES`).

  ``image_size`` >= 64 adds a downsampling stage (Tiny-ImageNet); ``width`` is
  the base channel count (model-specific default when None); ``deq_stride``
  overrides the stride of the DEQ's injection (2 on 64x64 inputs, else 1),
  ``tail_strides`` those of the DEQ models' three convs after it (2, 1, 1);
  ``batch_norm=False`` drops BatchNorm (DEQ and CNN models). DEQ models:
  ``deq_scale``, ``deq_param_mode`` ('project' | 'reparam') and ``deq_bound``
  ('spectral' | 'rho') make their `parametrize.Parametrization`. ``depth``:
  conv layers of 'cnn_depth' (7), ℓ∞-dist layers of 'linf_dist' (5, the last
  giving the logits) and 'linf_dist_mlp' (4, then the MLP head of ``dense``
  units); ``width`` is their neurons per layer (5120).
  """
  big = image_size >= 64
  if name in _DEQ_METHODS:
    w = width or 64
    stride = deq_stride or (2 if big else 1)
    return CerDEQ(num_classes, w, (2 * w,) * 3 + ((2 * w,) if big else ()),
                  tuple(tail_strides or (2, 1, 1)) + ((2,) if big else ()), (dense,),
                  (stride, stride),
                  parametrize.validate(parametrize.Parametrization(
                      _DEQ_METHODS[name], deq_scale, mode=deq_param_mode, bound=deq_bound)),
                  solver or solvers.Anderson(tol=1e-4, max_iter=50), adjoint_solver,
                  batch_norm)
  if name == 'cnn7':
    return cnn7(num_classes, width or 64, dense, big, batch_norm)
  if name == 'cnn_depth':
    return cnn_depth(num_classes, depth or 7, width or 64, dense, batch_norm)
  if name == 'linf_dist':
    return LinfDistNet(num_classes, depth or 5, width or 5120, 0)
  if name == 'linf_dist_mlp':
    return LinfDistNet(num_classes, depth or 4, width or 5120, dense)
  if name == 'wide_resnet':
    return wide_resnet(num_classes, width or 8, big)
  if name == 'resnext':
    return resnext(num_classes, width or 64, extra_downsample=big)
  raise ValueError(f'Unknown model {name!r}; choose one of {", ".join(MODEL_NAMES)}.')
