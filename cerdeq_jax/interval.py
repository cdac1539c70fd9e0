"""The `Interval` pytree: a box [lower, upper] of arrays with the same shape.

An interval is just another pytree state, so solvers, `jit`, `vmap` and
implicit differentiation treat it like any array.
"""
from __future__ import annotations

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
  mean, std = _per_channel(mean, x.ndim), _per_channel(std, x.ndim)
  if not isinstance(std, jax.core.Tracer) and np.any(np.asarray(std) <= 0):
    raise ValueError('std must be positive.')
  lo_valid = (pixel_range[0] - mean) / std
  hi_valid = (pixel_range[1] - mean) / std
  radius = eps / std
  return Interval(jnp.maximum(x - radius, lo_valid), jnp.minimum(x + radius, hi_valid))
