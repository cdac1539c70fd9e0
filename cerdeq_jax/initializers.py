"""Initialisers of the certified models (CerDEQ injection, Fast-IBP).

Both are N(0, sigma^2) with sigma a function of the fan-in; they take
``(key, shape, dtype)`` like `flax.linen.initializers`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def fan_in(shape) -> int:
  """``prod(shape[:-1])``: k*k*C_in for HWIO, D_in for a dense kernel."""
  return math.prod(shape[:-1])


def _normal_init(std_fn: Callable[[int], float]) -> Initializer:
  def init(key, shape, dtype: Any = jnp.float32):
    std = std_fn(fan_in(shape))
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


def cerdeq_injection_init() -> Initializer:
  """CerDEQ injection U ~ N(0, sigma^2), ``sigma = sqrt(pi) / (sqrt(2) * n_u)``,
  n_u = fan_in, so that ``n_u * E|U| = n_u * sigma * sqrt(2/pi) = 1`` (brief §4)."""
  return _normal_init(lambda n: math.sqrt(math.pi) / (math.sqrt(2.0) * n))


def fast_ibp_init(residual: bool = False) -> Initializer:
  """Fast-IBP init: N(0, sigma^2), ``sigma = sqrt(2*pi) / fan_in``, halved for
  weights after a residual add (brief §6)."""
  factor = 0.5 if residual else 1.0
  return _normal_init(lambda n: factor * math.sqrt(2.0 * math.pi) / n)
