"""The `Interval` pytree: a box [lower, upper] of arrays with the same shape.

An interval is just another pytree state, so solvers, `jit`, `vmap` and
implicit differentiation treat it like any array. It is *not* an array to
stock Flax layers, ``jnp`` functions or arithmetic operators: they raise a
``TypeError`` that names the certified layer (`cerdeq_jax.layers`) to use.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Interval(NamedTuple):
  """Element-wise bounds ``lower <= x <= upper``; both arrays of one shape."""

  lower: jax.Array
  upper: jax.Array

  @property
  def centre(self) -> jax.Array:
    return (self.upper + self.lower) / 2

  @property
  def radius(self) -> jax.Array:
    return (self.upper - self.lower) / 2

  @property
  def shape(self):
    return jnp.shape(self.lower)

  @property
  def dtype(self):
    return jnp.result_type(self.lower)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  # A NamedTuple is a sequence, so without these hooks jnp/np would quietly
  # stack (lower, upper) into one array of shape (2, ...), and stock Flax
  # layers would compute on it. jax looks `__jax_array__` up (with getattr)
  # before converting, also inside lax primitives, numpy calls `__array__`:
  # both refuse, naming the certified layer to use instead. A property, so
  # that the lookup itself raises (jax rejects objects that merely have it).
  @property
  def __jax_array__(self):
    raise TypeError(misuse_message())

  def __array__(self, dtype=None, copy=None):
    raise TypeError(misuse_message())

  @classmethod
  def from_centre_radius(cls, centre, radius) -> "Interval":
    return cls(centre - radius, centre + radius)

  @classmethod
  def point(cls, x) -> "Interval":
    """The zero-width interval [x, x]."""
    return cls(x, x)

  def map(self, fn) -> "Interval":
    """Applies a *monotone non-decreasing* element-wise ``fn`` to both ends."""
    return Interval(fn(self.lower), fn(self.upper))

  def contains(self, x, atol: float = 0.0) -> jax.Array:
    """Whether every element of ``x`` lies in the box (up to ``atol``)."""
    return jnp.all((x >= self.lower - atol) & (x <= self.upper + atol))


def is_interval(x) -> bool:
  return isinstance(x, Interval)


# Stock Flax layers with a certified counterpart of the same name in
# `cerdeq_jax.layers`, and functions with one of another name. (Pooling takes
# pytrees of operands, so it fails on an Interval before reaching our hooks.)
_SAME_NAME_LAYERS = ('Dense', 'Conv', 'BatchNorm')
_FUNCTION_LAYERS = {'relu': 'layers.ReLU()'}
_ALL_LAYERS = ('cerdeq_jax.layers (Dense, Conv, BatchNorm, ReLU/Activation, AvgPool/MaxPool, '
               'Flatten, DEQ, ElidedDense)')


def _misused_by() -> tuple[str, str] | None:
  """``('flax', ClassName)`` of the innermost stock Flax module on the call
  stack, else ``(module, function)`` of the outermost ``jax.numpy``/``jax.nn``
  function, else None. Only walked on the error path."""
  frame, function = sys._getframe(2), None  # pylint: disable=protected-access
  while frame is not None:
    owner = frame.f_locals.get('self')
    if type(owner).__module__.startswith('flax.linen'):
      return 'flax', type(owner).__name__
    module = frame.f_globals.get('__name__', '')
    if module.startswith(('jax._src.numpy', 'jax._src.nn')):
      function = (module, frame.f_code.co_name)
    frame = frame.f_back
  return function


def misuse_message() -> str:
  """Why an `Interval` cannot enter a stock Flax layer or ``jnp`` function,
  and which certified layer to use instead."""
  module, name = _misused_by() or ('', '')
  elementwise = module == 'jax._src.numpy.ufuncs' or module.startswith('jax._src.nn')
  prefix = 'jax.nn' if module.startswith('jax._src.nn') else 'jnp'
  if module == 'flax':
    where = f'flax.linen.{name}'
    use = (f'cerdeq_jax.layers.{name}' if name in _SAME_NAME_LAYERS
           else f'the certified layers of {_ALL_LAYERS}')
  elif name in _FUNCTION_LAYERS:
    where, use = f'{prefix}.{name}', f'cerdeq_jax.{_FUNCTION_LAYERS[name]}'
  elif elementwise and not name.startswith('_'):
    where = f'{prefix}.{name}'
    use = (f'layers.Activation({where}) or box.map({where}) if it is monotone '
           f'non-decreasing, else a rule of cerdeq_jax.ibp')
  else:
    where = f'jnp.{name}' if name and not name.startswith('_') else 'an array operation'
    use = f'the certified layers of {_ALL_LAYERS} or the rules of cerdeq_jax.ibp'
  return (f'{where} got a cerdeq_jax Interval (lower and upper bounds), not an array: it would '
          f'treat the pair as one array and bound nothing. Use {use}; for one end of the box '
          f'take box.lower, box.upper or box.centre.')


_OPERATOR_MESSAGE = (
    'arithmetic operators are not defined on a cerdeq_jax Interval (as a tuple, box * 2 would '
    'repeat it): use cerdeq_jax.ibp (add, scale_shift, linear_map, monotone) or layers.add, '
    'or operate on box.lower / box.upper.')


def _refuse_operator(self, other=None):
  del self, other
  raise TypeError(_OPERATOR_MESSAGE)


def _tuple_or_refuse(concat):
  """``+`` with a tuple stays tuple concatenation (generic pytree code may use
  it); with anything else it is an attempted interval sum: refused."""
  def op(self, other):
    if isinstance(other, tuple):
      return concat(self, other)
    raise TypeError(_OPERATOR_MESSAGE)
  return op


Interval.__add__ = _tuple_or_refuse(tuple.__add__)
Interval.__radd__ = _tuple_or_refuse(lambda self, other: tuple.__add__(other, self))
for _name in ('mul', 'rmul', 'sub', 'rsub', 'truediv', 'rtruediv', 'matmul', 'rmatmul', 'pow',
              'neg'):
  setattr(Interval, f'__{_name}__', _refuse_operator)
del _name


def checked(lower, upper) -> Interval:
  """Builds an `Interval`, raising ``ValueError`` on bad input.

  Checks shapes always, and finiteness and ``lower <= upper`` when the values
  are concrete (outside ``jit``).
  """
  if jnp.shape(lower) != jnp.shape(upper):
    raise ValueError(
        f'Interval bounds differ in shape: lower {jnp.shape(lower)} vs upper {jnp.shape(upper)}.')
  if not isinstance(lower, jax.core.Tracer) and not isinstance(upper, jax.core.Tracer):
    lo, up = np.asarray(lower), np.asarray(upper)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(up))):
      raise ValueError('Interval bounds contain non-finite values (NaN or inf).')
    if np.any(lo > up):
      worst = float(np.max(lo - up))
      raise ValueError(f'Interval has lower > upper (by up to {worst:.3g}).')
  return Interval(jnp.asarray(lower), jnp.asarray(upper))


def _per_channel(value, ndim: int) -> jax.Array:
  return jnp.asarray(value, jnp.float32).reshape((1,) * (ndim - 1) + (-1,))


def linf_ball(x, eps: float, mean: Sequence[float] | float = 0.0,
              std: Sequence[float] | float = 1.0,
              pixel_range: tuple[float, float] = (0.0, 1.0)) -> Interval:
  """The ℓ∞ ball of radius ``eps`` around a *normalised* input, as an `Interval`.

  Args:
    x: normalised input ``(pixels - mean) / std``, shape ``(..., C)`` (NHWC or
      ``(N, D)``), channels last.
    eps: radius in [0, 1] pixel units (e.g. 8/255); it becomes ``eps / std``
      after normalisation.
    mean, std: per-channel normalisation constants (scalars or length C).
    pixel_range: valid pixel range; the box is clipped to it.

  Returns:
    ``Interval`` in normalised units with the shape of ``x``.
  """
  if isinstance(eps, (int, float)) and not np.isfinite(eps):
    raise ValueError(f'eps must be finite, got {eps}.')
  if isinstance(eps, (int, float)) and eps < 0:
    raise ValueError(f'eps must be >= 0 (pixel units in [0, 1]), got {eps}.')
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x must be the normalised float input (pixels / 255 - mean) / std, got '
                     f'dtype {x.dtype}.')
  mean, std = _per_channel(mean, x.ndim), _per_channel(std, x.ndim)
  for name, value in (('mean', mean), ('std', std)):
    # Broadcasting would silently widen a 1-channel x to len(mean) channels.
    if value.shape[-1] not in (1, x.shape[-1]):
      raise ValueError(f'{name} has {value.shape[-1]} entries but x has {x.shape[-1]} channels '
                       f'(its last axis).')
  if not isinstance(std, jax.core.Tracer) and np.any(np.asarray(std) <= 0):
    raise ValueError('std must be positive.')
  lo_valid = (pixel_range[0] - mean) / std
  hi_valid = (pixel_range[1] - mean) / std
  # Outside the valid range the clipped box would not contain x (or be empty:
  # lower > upper), and bounds computed on it would not bound x's outputs.
  # Checked where x is concrete; inside a jit the caller's data must be valid.
  if not any(isinstance(v, jax.core.Tracer) for v in (x, mean, std)):
    values, lo, hi = np.asarray(x), np.asarray(lo_valid), np.asarray(hi_valid)
    slack = 1e-4 * np.maximum(1.0, hi - lo)
    outside = (values < lo - slack) | (values > hi + slack)
    if np.any(outside):
      raise ValueError(f'x has {int(np.sum(outside))} value(s) outside the pixel range '
                       f'{pixel_range}: it must be (pixels - mean) / std, pixels in that range.')
  radius = eps / std
  return Interval(jnp.maximum(x - radius, lo_valid), jnp.minimum(x + radius, hi_valid))
