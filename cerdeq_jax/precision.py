"""The precision policy of float32 dots and convolutions, in one place.

On TPUs, and on GPUs with TF32, XLA runs a float32 ``dot_general`` or
``convolution`` at reduced precision (bf16 passes, TF32: ~1e-3 relative error)
unless the op asks for ``HIGHEST``. Two classes of products:

* **Certificate and convergence products**, always `CERTIFY` (``HIGHEST``),
  not configurable: the DEQ cell in every solve (nominal, interval, adjoint)
  and in the step that is widened, the Anderson Gram matrix and mixing
  (`solvers`), the bounds L and rho (`deq`), the projections (`parametrize`,
  `orthogonal`, `reparam`) and the elided margins (`ibp.elided_margins`). A
  solver judges convergence by a residual of 1e-4 relative; with 1e-3 error
  per product it could never get there, and the widening and rho rest on these
  numbers. (The SVD behind L runs its own products at float32 on TPU.)
* **Layer products** (`ops.dense`, `ops.conv`, `ops.same_conv` called without a
  precision: the explicit layers, their interval bounds, PGD): `layer()`, which
  is ``HIGHEST`` unless code runs inside ``with layers(p):``. The train step
  enters ``layers(CertifiedTraining.precision)``; the evaluation step enters
  ``layers(HIGHEST)`` whatever the training setting, so certificates are
  always computed at full float32 precision.

The scope is read while JAX *traces*: enter it inside the function that is
jitted (as `training.train_step` and `training.eval_step` do), not around a call
of an already-jitted function, whose cache does not see it. On CPU, XLA ignores
the setting (float32 arithmetic either way), so CPU results do not depend on it.
"""
from __future__ import annotations

import contextlib
import contextvars

from jax import lax

Precision = lax.Precision
HIGHEST = Precision.HIGHEST
DEFAULT = Precision.DEFAULT
#: The precision of every product a certificate or a convergence decision reads.
CERTIFY = HIGHEST

#: Names accepted by `parse` (flags, configs).
NAMES = {'highest': HIGHEST, 'high': Precision.HIGH, 'default': DEFAULT}

_layer = contextvars.ContextVar('cerdeq_layer_precision', default=HIGHEST)


def parse(value: str | Precision) -> Precision:
  """``'highest' | 'high' | 'default'`` (or a `lax.Precision`) -> `lax.Precision`."""
  if isinstance(value, Precision):
    return value
  if value not in NAMES:
    raise ValueError(f"precision must be one of {', '.join(NAMES)}, got {value!r}")
  return NAMES[value]


def layer() -> Precision:
  """The precision of layer products now (``HIGHEST`` outside any scope)."""
  return _layer.get()


def resolve(precision: Precision | None) -> Precision:
  """An explicit precision, or the current layer precision for None."""
  return layer() if precision is None else precision


@contextlib.contextmanager
def layers(precision: str | Precision):
  """Layer products traced inside the block use ``precision``."""
  token = _layer.set(parse(precision))
  try:
    yield
  finally:
    _layer.reset(token)
