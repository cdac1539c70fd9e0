"""Interval Bound Propagation rules.

Every rule maps an `Interval` to an `Interval` that encloses the image of every
point of the input box. Affine maps use the centre/radius form
``W c + b ± |W| r`` (two linear applications), monotone activations map the ends.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from cerdeq_jax import ops
from cerdeq_jax.interval import Interval
from cerdeq_jax.precision import CERTIFY


def linear_map(x: Interval, apply: Callable, apply_abs: Callable, bias=None) -> Interval:
  """IBP of ``z -> apply(z) + bias`` where ``apply`` is linear and ``apply_abs``
  is the same operator with element-wise absolute coefficients."""
  centre = apply(x.centre)
  if bias is not None:
    centre = centre + bias
  radius = apply_abs(x.radius)
  return Interval(centre - radius, centre + radius)


def dense(x: Interval, kernel, bias=None, precision=None) -> Interval:
  """x: ``(..., D_in)``, kernel ``(D_in, D_out)``; precision None: the layer
  precision (`cerdeq_jax.precision`)."""
  abs_kernel = jnp.abs(kernel)
  return linear_map(x, lambda z: ops.dense(z, kernel, precision),
                    lambda r: ops.dense(r, abs_kernel, precision), bias)


def conv(x: Interval, kernel, bias=None, strides: Sequence[int] = (1, 1),
         padding: ops.Padding = 'SAME', feature_group_count: int = 1) -> Interval:
  """NHWC input, HWIO kernel; |W| is the convolution with |kernel|."""
  return linear_map(x, ops.conv_op(kernel, strides, padding, feature_group_count),
                    ops.conv_op(jnp.abs(kernel), strides, padding, feature_group_count), bias)


def scale_shift(x: Interval, scale, shift) -> Interval:
  """Per-element affine ``scale * z + shift`` (BatchNorm in both modes); the
  scale may be negative."""
  centre = x.centre * scale + shift
  radius = x.radius * jnp.abs(scale)
  return Interval(centre - radius, centre + radius)


def monotone(x: Interval, fn: Callable) -> Interval:
  """Element-wise non-decreasing ``fn`` (ReLU, sigmoid, tanh, leaky ReLU...)."""
  return x.map(fn)


def relu(x: Interval) -> Interval:
  return monotone(x, jax.nn.relu)


def add(a: Interval, b: Interval) -> Interval:
  """Residual add: bounds of a sum are the sums of the bounds."""
  return Interval(a.lower + b.lower, a.upper + b.upper)


def flatten(x: Interval) -> Interval:
  """``(N, ...) -> (N, prod(...))``."""
  return x.map(lambda z: z.reshape(z.shape[0], -1))


def avg_pool(x: Interval, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: str = 'VALID') -> Interval:
  """Average pooling is a positive linear map, so it maps the ends."""
  from flax import linen as nn
  return x.map(lambda z: nn.avg_pool(z, tuple(window), strides and tuple(strides), padding))


def max_pool(x: Interval, window: Sequence[int], strides: Sequence[int] | None = None,
             padding: str = 'VALID') -> Interval:
  """Max pooling is monotone in every input, so it maps the ends."""
  from flax import linen as nn
  return x.map(lambda z: nn.max_pool(z, tuple(window), strides and tuple(strides), padding))


def elided_margins(x: Interval, kernel, bias, labels, precision=CERTIFY) -> jax.Array:
  """Lower bounds of the margins ``logit_y - logit_j`` of a final dense layer.

  The classifier is *elided* with the specification ``c_j = e_y - e_j``: the
  bound of ``(W[:, y] - W[:, j]) . z + b_y - b_j`` is taken directly, which is
  tighter than subtracting the logit bounds.

  Args:
    x: interval of the features, ``(N, D)``.
    kernel: ``(D, K)``; bias ``(K,)`` or None.
    labels: int ``(N,)``.

  Returns:
    ``(N, K)`` lower bounds; the entry ``j = y`` is exactly 0. At full
    precision by default, in training too (what certifies; an ``N x D x K``
    product, cheap next to the layers).
  """
  if x.lower.ndim != 2 or x.lower.shape[-1] != kernel.shape[0]:
    raise ValueError(f'elided_margins: features {x.lower.shape} do not match kernel {kernel.shape}.')
  # diff[n, :, j] = W[:, y_n] - W[:, j]
  w_y = jnp.take(kernel, labels, axis=1).T  # (N, D)
  diff = w_y[:, :, None] - kernel[None]  # (N, D, K)
  centre = jnp.einsum('nd,ndk->nk', x.centre, diff, precision=precision)
  radius = jnp.einsum('nd,ndk->nk', x.radius, jnp.abs(diff), precision=precision)
  margins = centre - radius
  if bias is not None:
    margins = margins + (jnp.take(bias, labels)[:, None] - bias[None])
  return jnp.where(jax.nn.one_hot(labels, kernel.shape[1], dtype=bool), 0.0, margins)


def margins_from_logits(logits, labels) -> jax.Array:
  """Exact margins ``logit_y - logit_j`` of points (0 at ``j = y``)."""
  return jnp.take_along_axis(logits, labels[:, None], axis=1) - logits


def certified(margins, labels) -> jax.Array:
  """Bool ``(N,)``: every margin lower bound ``j != y`` is > 0 (NaN counts as not)."""
  others = ~jax.nn.one_hot(labels, margins.shape[-1], dtype=bool)
  return jnp.all(jnp.where(others, margins > 0, True), -1)
