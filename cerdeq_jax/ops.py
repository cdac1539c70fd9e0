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


def _same_pads(kernel, spatial: Sequence[int], strides: Sequence[int]):
  """XLA's 'SAME' padding ``(low, high)`` per spatial axis of an input of
  size ``spatial``: ``ceil(n / s)`` outputs, the padding split with one more
  pixel after than before when odd (an even kernel at stride 1)."""
  pads = []
  for k, n, s in zip(kernel.shape[:2], spatial, strides):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


def _transposed_pads(kernel, spatial: Sequence[int]):
  """The stride-1 'SAME' pads ``(high, low)`` of the transposed convolution:
  flipping the kernel mirrors the forward pass's ``(low, high)``. Equal for
  odd kernels; for even ones plain 'SAME' would shift by one pixel."""
  return tuple((high, low) for low, high in _same_pads(kernel, spatial, (1, 1)))


def same_conv(x, kernel, precision=None, strides: Sequence[int] = (1, 1)):
  """'SAME' convolution (any kernel size and strides) whose VJP is made of
  forward convolutions and products; it runs at the forward's precision.

  Numerically identical to `conv`; it exists because XLA:CPU runs the default
  transposed convolution inside ``while_loop`` bodies about 15x slower than a
  forward one (see docs/performance.md), and the implicit backward pass of a
  DEQ iterates exactly that VJP. At stride 1 the input-VJP is one forward
  convolution with the flipped, in/out-swapped kernel; at stride s, s*s of
  them with the kernel's taps of each phase (XLA's own convolves a
  zero-dilated cotangent: 1.5x the time at CIFAR-10's stride-2 tail conv).
  """
  return _same_conv(x, kernel, policy.resolve(precision), tuple(strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _same_conv(x, kernel, precision, strides):
  return conv(x, kernel, strides, precision=precision)


def _same_conv_fwd(x, kernel, precision, strides):
  return conv(x, kernel, strides, precision=precision), (x, kernel)


def _phase_grid(x_shape, kernel, strides):
  """``(pads, (H'/s, W'/s))``: the 'SAME' pads of an input ``(N, H, W, C)``
  and its padded size ``H' x W'``, rounded up to multiples of the strides."""
  pads = _same_pads(kernel, x_shape[1:3], strides)
  return pads, tuple(-(-(n + low + high) // s)
                     for n, (low, high), s in zip(x_shape[1:3], pads, strides))


def _phases(x, kernel, strides):
  """``x`` zero-padded as 'SAME' and up to a multiple of the strides,
  ``(N, H'/s, s, W'/s, s, C)``: the input of tap ``(i, j)`` is the slice
  ``[:, i//s : i//s + H_out, i%s, j//s : j//s + W_out, j%s]``."""
  ((pt, _), (pl, _)), (hq, wq) = _phase_grid(x.shape, kernel, strides)
  (sh, sw), (n, h, w, c) = strides, x.shape
  padded = jnp.pad(x, ((0, 0), (pt, hq * sh - h - pt), (pl, wq * sw - w - pl), (0, 0)))
  return padded.reshape(n, hq, sh, wq, sw, c)


def _same_conv_kernel_grad(x, g, kernel, precision, strides):
  """``d/dK sum(conv(x, K) * g)`` as ``k*k`` contractions of shifted copies (of
  the cotangent at stride 1, `_sliding_taps`; else of the input, `_phase_taps`).

  Not a convolution on purpose: under ``vmap`` (the batched DEQ solves) the
  kernel gradient becomes per-sample, i.e. a grouped convolution with one group
  per sample, and XLA's SPMD partitioner computes that grouped convolution
  wrongly when the batch is sharded (jax 0.10, CPU: the hidden-kernel gradient
  of a data-parallel step was garbage). Batched contractions partition correctly.

  The taps run in a ``scan``, each summing over the batch, so that one shifted
  copy is alive at a time instead of ``k*k`` (0.9 GB of the
  CIFAR-10 certified CerDEQ step) and no per-sample gradient is kept (75 MB a
  tap for a 128-channel layer at batch 128). A sum over a sharded batch inside
  the loop would be an all-reduce inside it, so under a mesh each device sums
  its own samples and the devices' sums are added after the loop
  (`cerdeq_jax.per_device`).
  """
  kh, kw = kernel.shape[:2]

  @jax.named_scope(KERNEL_TAPS)  # a name for the precision tests to find them by
  def product(rows, columns):
    return jnp.matmul(rows, columns, precision=precision)

  def summed_taps(x, g):
    if tuple(strides) == (1, 1) and kh * kw * x.shape[-1] > g.shape[-1]:
      return _sliding_taps(x, g, kernel, product)
    return _phase_taps(x, g, kernel, strides, product)

  grad = per_device.sum_batch(summed_taps, (0, 0), x, g)
  return grad.swapaxes(1, 2).reshape(kernel.shape).astype(kernel.dtype)


def _sliding_taps(x, g, kernel, product):
  """The tap gradients ``(k*k, O, I)`` of a stride-1 'SAME' convolution,
  summed over the batch, in a ``scan``: tap (i, j) pairs input pixel q with
  output pixel ``q - (i, j) + pad``, so it slides g, padded as the input-VJP
  pads it (`_transposed_pads`), over the input as it is. No padded copy of the
  input is made: it would depend on the forward pass only, so XLA computed it
  right after the forward pass and kept it to the end of the backward one
  (36 MiB per pass at CIFAR-10 shape). g^T ``(O, N, H', W')`` is made once, so each tap is one
  ``(O, K) @ (K, I)`` product of a plain slice copy (with a shifted copy on the
  left, XLA:CPU transposed it at every tap: twice the time).
  """
  kh, kw = kernel.shape[:2]
  n, h, w, o = g.shape
  g_t = jnp.pad(g, ((0, 0),) + _transposed_pads(kernel, x.shape[1:3]) + ((0, 0),))
  g_t = g_t.transpose(3, 0, 1, 2)
  columns = x.reshape(-1, x.shape[-1])

  def tap(carry, index):
    start = (0, 0, kh - 1 - index // kw, kw - 1 - index % kw)
    rows = lax.dynamic_slice(g_t, start, (o, n, h, w)).reshape(o, -1)
    return carry, product(rows, columns)

  return lax.scan(tap, None, jnp.arange(kh * kw))[1]


def _phase_taps(x, g, kernel, strides, product):
  """The tap gradients ``(k*k, O, I)`` of a strided convolution (or of a
  narrow input), summed over the batch, from the stride phases of the padded
  input (`_phases`). An input so narrow that its k*k shifted copies together
  are no larger than g (k*k*C_in <= C_out: an image's channels) takes all taps
  in one product, 5x faster than a scan of ``(O, K) @ (K, 3)``; other inputs
  one tap at a time in a ``scan``."""
  kh, kw = kernel.shape[:2]
  (sh, sw), (n, ho, wo, o), c = strides, g.shape, x.shape[-1]
  phases = _phases(x, kernel, strides)
  g_rows = g.reshape(-1, o).T   # made once (see `_sliding_taps`)

  def shifted(index):  # (N*H_out*W_out, I); index static or traced
    start = (0, index // kw // sh, index // kw % sh, index % kw // sw, index % kw % sw, 0)
    return lax.dynamic_slice(phases, start, (n, ho, 1, wo, 1, c)).reshape(-1, c)

  if kh * kw * c <= o:
    taps = jnp.concatenate([shifted(t) for t in range(kh * kw)], axis=1)
    return product(g_rows, taps).reshape(o, kh * kw, c).swapaxes(0, 1)
  return lax.scan(lambda carry, t: (carry, product(g_rows, shifted(t))), None,
                  jnp.arange(kh * kw))[1]


def _same_conv_input_grad(x, g, kernel, precision, strides):
  """The input-VJP as forward convolutions of the cotangent ``g``."""
  flipped = lambda k: jnp.flip(k, axis=(0, 1)).swapaxes(2, 3)
  if tuple(strides) == (1, 1):
    return conv(g, flipped(kernel), padding=list(_transposed_pads(kernel, x.shape[1:3])),
                precision=precision)
  # Phase (a, b) of the padded input's gradient (rows a + s*p, columns b + s*q)
  # receives only the taps i = a (mod s), j = b (mod s): a stride-1 full
  # correlation of g with those taps, flipped.
  ((pt, _), (pl, _)), (hq, wq) = _phase_grid(x.shape, kernel, strides)
  (sh, sw), (n, h, w, c) = strides, x.shape

  def by_phases(g, kernel):
    rows = []
    for a in range(sh):
      row = []
      for b in range(sw):
        taps = kernel[a::sh, b::sw]
        ka, kb = taps.shape[:2]
        if ka == 0 or kb == 0:  # a kernel smaller than the stride skips this phase
          row.append(jnp.zeros((n, hq, wq, c), g.dtype))
          continue
        padding = [(ka - 1, hq - g.shape[1]), (kb - 1, wq - g.shape[2])]
        row.append(conv(g, flipped(taps), padding=padding, precision=precision))
      rows.append(jnp.stack(row, axis=3))
    padded = jnp.stack(rows, axis=2).reshape(n, hq * sh, wq * sw, c)
    return padded[:, pt:pt + h, pl:pl + w]

  # Automatic axes: explicit sharding has no rule for the interleaving reshape.
  return per_device.automatic_axes(by_phases, g, kernel)


def _same_conv_bwd(precision, strides, res, g):
  x, kernel = res
  return (_same_conv_input_grad(x, g, kernel, precision, strides),
          _same_conv_kernel_grad(x, g, kernel, precision, strides))


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def conv_op(kernel, strides=(1, 1), padding: Padding = 'SAME', feature_group_count: int = 1,
            precision=None):
  """Returns ``x -> conv(x, kernel)``, using `same_conv` where it applies."""
  if padding == 'SAME' and feature_group_count == 1:
    return lambda x: same_conv(x, kernel, precision, strides)
  return lambda x: conv(x, kernel, strides, padding, feature_group_count, precision)
