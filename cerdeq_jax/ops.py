"""Linear operators shared by the array path and the interval path.

All of them run at full float32 precision (``Precision.HIGHEST``) by default:
bounds used for certification must not be computed in bf16/TF32, and the
array path uses the same precision so that a zero-width interval reproduces it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST
_CONV_DIMS = ('NHWC', 'HWIO', 'NHWC')

Padding = str | Sequence[tuple[int, int]]


def dense(x, kernel, precision=HIGHEST):
  """``x @ kernel``; x ``(..., D_in)``, kernel ``(D_in, D_out)``."""
  return jnp.matmul(x, kernel, precision=precision)


def conv(x, kernel, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
         feature_group_count: int = 1, precision=HIGHEST):
  """2-D convolution, NHWC input and HWIO kernel ``(k, k, C_in / groups, C_out)``."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=_CONV_DIMS, feature_group_count=feature_group_count,
      precision=precision)


def _same_pads(kernel) -> tuple[tuple[int, int], tuple[int, int]]:
  """XLA's stride-1 'SAME' padding ``(low, high)`` per spatial axis: a kernel
  of even size ``k`` pads one more pixel after than before."""
  return tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:2])


@jax.custom_vjp
def same_conv(x, kernel):
  """Stride-1 'SAME' convolution (any kernel size) whose input-VJP is again a
  *forward* convolution (flipped, in/out-swapped kernel).

  Numerically identical to `conv`; it exists because XLA:CPU runs the default
  transposed convolution inside ``while_loop`` bodies about 15x slower than a
  forward one (see docs/performance.md), and the implicit backward pass of a
  DEQ iterates exactly that VJP.
  """
  return conv(x, kernel)


def _same_conv_fwd(x, kernel):
  return conv(x, kernel), (x, kernel)


def _same_conv_kernel_grad(x, g, kernel):
  """``d/dK sum(conv(x, K) * g)`` as ``k*k`` contractions of shifted inputs.

  Not a convolution on purpose: under ``vmap`` (the batched DEQ solves) the
  kernel gradient becomes per-sample, i.e. a grouped convolution with one group
  per sample, and XLA's SPMD partitioner computes that grouped convolution
  wrongly when the batch is sharded (jax 0.10, CPU: the hidden-kernel gradient
  of a data-parallel step was garbage). Batched contractions partition correctly.
  """
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0),) + _same_pads(kernel) + ((0, 0),))
  taps = [[jnp.einsum('nhwi,nhwo->io', padded[:, a:a + h, b:b + w, :], g, precision=HIGHEST)
           for b in range(kw)] for a in range(kh)]
  return jnp.stack([jnp.stack(row) for row in taps]).astype(kernel.dtype)


def _same_conv_bwd(res, g):
  x, kernel = res
  flipped = jnp.flip(kernel, axis=(0, 1)).swapaxes(2, 3)
  # Flipping the kernel mirrors the padding: the transpose pads (high, low)
  # where the forward pass padded (low, high). Equal for odd kernels; for even
  # ones plain 'SAME' would shift the gradient by one pixel.
  mirrored = [(high, low) for low, high in _same_pads(kernel)]
  dx = conv(g, flipped, padding=mirrored)
  return dx, _same_conv_kernel_grad(x, g, kernel)


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def conv_op(kernel, strides=(1, 1), padding: Padding = 'SAME', feature_group_count: int = 1):
  """Returns ``x -> conv(x, kernel)``, using `same_conv` where it applies."""
  if tuple(strides) == (1, 1) and padding == 'SAME' and feature_group_count == 1:
    return lambda x: same_conv(x, kernel)
  return lambda x: conv(x, kernel, strides, padding, feature_group_count)
