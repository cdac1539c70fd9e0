"""Linear operators shared by the array path and the interval path.

``precision=None`` (the default) is the layer precision of the policy in
`cerdeq_jax.precision`: ``HIGHEST`` unless a training pass lowered it, and
always ``HIGHEST`` in evaluation, so bounds used for certification are never
computed in bf16/TF32. The array path uses the same precision as the interval
path, so that a zero-width interval reproduces it. Callers whose numbers decide
a certificate or a convergence pass ``precision.CERTIFY``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cerdeq_jax import per_device, precision as policy

HIGHEST = lax.Precision.HIGHEST
_CONV_DIMS = ('NHWC', 'HWIO', 'NHWC')

Padding = str | Sequence[tuple[int, int]]
#: Name scope of `same_conv`'s kernel-gradient products.
KERNEL_TAPS = 'same_conv_kernel_taps'


def dense(x, kernel, precision=None):
  """``x @ kernel``; x ``(..., D_in)``, kernel ``(D_in, D_out)``."""
  return per_device.automatic_axes(
      lambda x, kernel: jnp.matmul(x, kernel, precision=policy.resolve(precision)), x, kernel)


def conv(x, kernel, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
         feature_group_count: int = 1, precision=None):
  """2-D convolution, NHWC input and HWIO kernel ``(k, k, C_in / groups, C_out)``."""
  def plain(x, kernel):
    return lax.conv_general_dilated(
        x, kernel, window_strides=tuple(strides), padding=padding,
        dimension_numbers=_CONV_DIMS, feature_group_count=feature_group_count,
        precision=policy.resolve(precision))

  return per_device.automatic_axes(plain, x, kernel)


def _same_pads(kernel) -> tuple[tuple[int, int], tuple[int, int]]:
  """XLA's stride-1 'SAME' padding ``(low, high)`` per spatial axis: a kernel
  of even size ``k`` pads one more pixel after than before."""
  return tuple(((k - 1) // 2, k // 2) for k in kernel.shape[:2])


def same_conv(x, kernel, precision=None):
  """Stride-1 'SAME' convolution (any kernel size) whose input-VJP is again a
  *forward* convolution (flipped, in/out-swapped kernel); its VJP runs at the
  forward's precision.

  Numerically identical to `conv`; it exists because XLA:CPU runs the default
  transposed convolution inside ``while_loop`` bodies about 15x slower than a
  forward one (see docs/performance.md), and the implicit backward pass of a
  DEQ iterates exactly that VJP.
  """
  return _same_conv(x, kernel, policy.resolve(precision))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _same_conv(x, kernel, precision):
  return conv(x, kernel, precision=precision)


def _same_conv_fwd(x, kernel, precision):
  return conv(x, kernel, precision=precision), (x, kernel)


def _same_conv_kernel_grad(x, g, kernel, precision):
  """``d/dK sum(conv(x, K) * g)`` as ``k*k`` contractions of shifted inputs.

  Not a convolution on purpose: under ``vmap`` (the batched DEQ solves) the
  kernel gradient becomes per-sample, i.e. a grouped convolution with one group
  per sample, and XLA's SPMD partitioner computes that grouped convolution
  wrongly when the batch is sharded (jax 0.10, CPU: the hidden-kernel gradient
  of a data-parallel step was garbage). Batched contractions partition correctly.

  The taps run in a ``scan``, each summing over the batch, so that one shifted
  copy of the input is alive at a time instead of ``k*k`` (0.9 GB of the
  CIFAR-10 certified CerDEQ step) and no per-sample gradient is kept (75 MB a
  tap for a 128-channel layer at batch 128). A sum over a sharded batch inside
  the loop would be an all-reduce inside it, so under a mesh each device sums
  its own samples and the devices' sums are added after the loop
  (`cerdeq_jax.per_device`).
  """
  kh, kw = kernel.shape[:2]

  def summed_taps(x, g):
    padded = jnp.pad(x, ((0, 0),) + _same_pads(kernel) + ((0, 0),))
    # g^T (O, N*H*W), made once: each tap is then one (O, K) @ (K, I) product
    # of a plain slice copy. With the shifted input on the left, XLA:CPU made
    # a *transposed* copy of it at every tap (twice the time of this form).
    g_rows = g.reshape(-1, g.shape[-1]).T

    @jax.named_scope(KERNEL_TAPS)  # a name for the precision tests to find them by
    def product(columns):
      return jnp.matmul(g_rows, columns, precision=precision)

    rows = lambda shifted: shifted.reshape(-1, x.shape[-1])
    if kh * kw * x.shape[-1] <= g.shape[-1]:
      # A narrow input (an image's channels): all taps in one product, 5x
      # faster than a scan of (O, K) @ (K, 3) products; the k*k copies
      # together are no larger than g.
      _, h, w, _ = x.shape
      taps = [rows(padded[:, i:i + h, j:j + w]) for i in range(kh) for j in range(kw)]
      return product(jnp.concatenate(taps, axis=1)).reshape(g.shape[-1], kh * kw, -1).swapaxes(0, 1)   # (k*k, O, I)

    def tap(carry, index):
      shifted = lax.dynamic_slice(padded, (0, index // kw, index % kw, 0), x.shape)
      return carry, product(rows(shifted))

    return lax.scan(tap, None, jnp.arange(kh * kw))[1]   # (k*k, O, I)

  grad = per_device.sum_batch(summed_taps, (0, 0), x, g)
  return grad.swapaxes(1, 2).reshape(kernel.shape).astype(kernel.dtype)


def _same_conv_bwd(precision, res, g):
  x, kernel = res
  flipped = jnp.flip(kernel, axis=(0, 1)).swapaxes(2, 3)
  # Flipping the kernel mirrors the padding: the transpose pads (high, low)
  # where the forward pass padded (low, high). Equal for odd kernels; for even
  # ones plain 'SAME' would shift the gradient by one pixel.
  mirrored = [(high, low) for low, high in _same_pads(kernel)]
  dx = conv(g, flipped, padding=mirrored, precision=precision)
  return dx, _same_conv_kernel_grad(x, g, kernel, precision)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def conv_op(kernel, strides=(1, 1), padding: Padding = 'SAME', feature_group_count: int = 1,
            precision=None):
  """Returns ``x -> conv(x, kernel)``, using `same_conv` where it applies."""
  if tuple(strides) == (1, 1) and padding == 'SAME' and feature_group_count == 1:
    return lambda x: same_conv(x, kernel, precision)
  return lambda x: conv(x, kernel, strides, padding, feature_group_count, precision)
