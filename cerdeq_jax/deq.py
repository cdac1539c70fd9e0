"""The DEQ cell ``z = σ(W z + U x + b)``, its interval ("adjoint") DEQ, the
contraction bound L and the sound widening of a computed interval fixed point.

The nominal DEQ and the interval DEQ are one code path: the same
`implicit.fixed_point` (hence the same solver and the same implicit
gradients) applied to a cell whose state is an array or an `Interval`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cerdeq_jax import ibp, implicit, ops, solvers
from cerdeq_jax.interval import Interval
from cerdeq_jax.orthogonal import at_least_f32
from cerdeq_jax.precision import CERTIFY

# Relative safety margin on the float32 SVD of S (its relative error is ~1e-6).
_NORM_SAFETY = 1.0 + 1e-4


class DEQStats(NamedTuple):
  """Per-sample statistics of a DEQ solve (leading batch dimension).

  lipschitz: the contraction constant certified for the kernel,
    ``min(L, rho)``: L (`abs_operator_bound`) in the 2-norm, rho
    (`channel_contraction`) in a weighted sup-norm. Either < 1 makes the DEQ and
    its interval DEQ contractions; the widening uses both (`sound_widening`).
  certifiable: the solve converged and ``min(L, rho) < 1``, so the (widened)
    interval bounds are sound for the exact fixed point. Always False for arrays.
  """
  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array
  lipschitz: jax.Array
  certifiable: jax.Array


def channel_sums(kernel) -> jax.Array:
  """``S (O, I)``, ``S[o, i] = sum_{h,w} |K[h, w, i, o]|`` of an HWIO (or dense
  ``(I, O)``) kernel: the matrix whose norms bound ``|W|``."""
  kernel = at_least_f32(kernel)
  return jnp.sum(jnp.abs(kernel.reshape((-1,) + kernel.shape[-2:])), axis=0).T


def abs_operator_bound(kernel) -> jax.Array:
  """Upper bound L on ``|| |W| ||_2`` for the convolution (or dense map) W.

  For an HWIO kernel K, ``S[o, i] = sum_{h,w} |K[h, w, i, o]|`` and
  ``|| |W| ||_2 <= ||S||_2`` for zero padding and any input size (equality for
  circular padding): a non-negative kernel's symbol peaks at frequency 0, and
  zero padding compresses the circular operator. A dense ``(D_in, D_out)``
  kernel gives ``||abs(K)^T||_2`` exactly. Since ``||W||_2 <= || |W| ||_2`` the
  bound also makes the nominal DEQ contractive. Differentiable (through the SVD).
  """
  return jnp.linalg.norm(channel_sums(kernel), ord=2) * _NORM_SAFETY


# --- cells: pure functions of (theta, z); theta = (hidden_kernel, injection) ---
# Always at full precision (`precision.CERTIFY`), also in training passes: the
# solvers decide convergence on these numbers, and the widened bounds are one
# more cell step.

def deq_cell(theta, z, activation: Callable = jax.nn.relu):
  """One DEQ step for a batch ``z: (N, H, W, C)``; injection = U x + b, same shape.

  Batch-level, not a vmapped per-sample cell: each sample's output depends
  only on its own input, and the kernel gradient then sums over the batch
  inside `ops.same_conv`'s tap loop instead of keeping one per sample."""
  kernel, injection = theta
  return activation(ops.same_conv(z, kernel, CERTIFY) + injection)


def interval_deq_cell(theta, z: Interval, activation: Callable = jax.nn.relu) -> Interval:
  """IBP of one DEQ step (two convs) for a batch; injection is the interval of U x + b."""
  kernel, injection = theta
  pre = ibp.linear_map(z, lambda c: ops.same_conv(c, kernel, CERTIFY),
                       lambda r: ops.same_conv(r, jnp.abs(kernel), CERTIFY))
  return ibp.monotone(Interval(pre.lower + injection.lower, pre.upper + injection.upper),
                      activation)


def _perron_vector(s) -> jax.Array:
  """Positive ``v (C,)``, ``max v = 1``: power iteration on ``s / max(s)`` (no
  gradient), so v does not depend on the scale of s."""
  s = jax.lax.stop_gradient(s)
  s = s / jnp.maximum(jnp.max(s), jnp.finfo(s.dtype).tiny)
  def power(_, v):
    # The shift keeps v positive (and helps reducible S).
    v = jnp.matmul(s, v, precision=CERTIFY) + 1e-6
    return v / jnp.max(v)
  v = jax.lax.fori_loop(0, 100, power, jnp.ones(s.shape[1], s.dtype))
  return jnp.maximum(v, 1e-3)


def collatz_wielandt(kernel, v, y=None) -> jax.Array:
  """``rho(v) = max_o (S v)_o / v_o`` (times the SVD safety factor) for a
  positive ``v (C,)``: ``S v <= rho v``, so ``rho(v) >= rho(S)`` for *every*
  positive v (Collatz–Wielandt).

  Gradient w.r.t. the kernel, with v (and y) held fixed: with the left vector
  ``y (C,)``, that of the ``y_o v_o``-weighted mean of the ratios (the value
  stays the max), which is the derivative of the Perron root itself,
  ``d rho(S) = y^T dS v / y^T v``, when v and y are the Perron vectors; the
  max's own gradient would load one arbitrary channel (the ratios tie at the
  Perron vector). Without y, the max's gradient.
  """
  ratios = jnp.matmul(channel_sums(kernel), v, precision=CERTIFY) / v
  rho = jnp.max(ratios)
  if y is not None:
    mean = jnp.sum(jax.lax.stop_gradient(y * v / jnp.sum(y * v)) * ratios)
    # mean - stop_gradient(mean) is exactly 0: the value stays the max, bit for bit.
    rho = jax.lax.stop_gradient(rho) + (mean - jax.lax.stop_gradient(mean))
  return rho * _NORM_SAFETY


def channel_contraction(kernel) -> tuple[jax.Array, jax.Array]:
  """Positive channel weights ``v (C,)`` and ``rho`` with ``S v <= rho v``.

  ``S[o, i] = sum_hw |K[h, w, i, o]|``. With zero padding ``|W| v <= S v <= rho v``
  pixel-wise (border pixels see fewer taps), so the DEQ map and its interval
  map are contractions with constant ``rho`` in the weighted sup-norm
  ``||z||_v = max |z_c| / v_c``. ``v`` is the Perron vector of S by power
  iteration; ``rho`` is checked for that v (`collatz_wielandt`), so it is a
  rigorous constant whatever the power iteration's accuracy, and close to the
  spectral radius ``rho(S) <= ||S||_2``. No gradient flows through v (rho(v)
  is a valid bound for any v). v does not depend on the kernel's scale, so
  ``rho(c K) = c rho(K)`` up to rounding (a rescaling by ``scale / rho`` lands
  on ``scale``).
  """
  s = channel_sums(kernel)
  v = _perron_vector(s)
  return v, collatz_wielandt(kernel, v, _perron_vector(s.T))


def _per_sample(x, reduce):
  return reduce(x.reshape(x.shape[0], -1), axis=1)


def sound_widening(z: Interval, fz: Interval, kernel, lipschitz=None, channel=None):
  """Bounds that enclose the exact interval fixed point, from an approximate
  one ``z`` and ``fz = F(z)`` (one more interval step).

  For a contraction F with constant q in a norm, ``||F(z) - z*|| <= q/(1-q)
  ||F(z) - z||``. Two rigorous per-coordinate widths, of which the smaller is
  used: the weighted sup-norm one, ``v_c * rho/(1-rho) * max_i |r_i|/v_i``
  (`channel_contraction`), and the 2-norm one, ``L/(1-L) * ||r||_2`` with
  ``L = || |W| ||_2`` bound (`abs_operator_bound`); ``r = F(z) - z`` per sample
  over both ends. Either constant alone may be >= 1 (a kernel kept at
  ``rho <= s`` may have ``L > 1``): its width is then infinite and the other
  one certifies. ``lipschitz`` and ``channel = (v, rho)``, when given, are
  those of ``kernel`` (to compute them once). Returns ``(widened fz,
  certifiable-contraction (N,) bool)``.
  """
  if lipschitz is None:
    lipschitz = abs_operator_bound(kernel)
  v, rho = channel_contraction(kernel) if channel is None else channel
  res = jnp.concatenate([(fz.lower - z.lower)[..., None], (fz.upper - z.upper)[..., None]], -1)
  shape = (-1,) + (1,) * (z.lower.ndim - 1)
  res_v = _per_sample(jnp.abs(res) / v[:, None], jnp.max).reshape(shape)
  res_2 = jnp.sqrt(_per_sample(jnp.square(res), jnp.sum)).reshape(shape)
  # Select, not multiply: inf * a zero residual would be NaN.
  width_v = jnp.where(rho < 1, rho / (1 - rho) * res_v * v, jnp.inf)
  width_2 = jnp.where(lipschitz < 1, lipschitz / (1 - lipschitz) * res_2, jnp.inf)
  width = jax.lax.stop_gradient(jnp.minimum(width_v, width_2))
  contraction = jnp.broadcast_to((rho < 1) | (lipschitz < 1), (z.lower.shape[0],))
  return Interval(fz.lower - width, fz.upper + width), contraction


def solve_deq(kernel, injection, solver: solvers.Solver,
              adjoint_solver: solvers.Solver | None = None,
              activation: Callable = jax.nn.relu, z0=None, sound: bool = True):
  """Fixed points of ``z = σ(W z + injection)`` for a batch.

  Args:
    kernel: hidden HWIO kernel ``(k, k, C, C)`` (stride 1, SAME).
    injection: ``U x + b``, ``(N, H, W, C)`` array or `Interval`.
    solver: forward solver; adjoint_solver: backward solver.
    z0: initial state (default zeros, or [0, 0] for an interval).
    sound: for an `Interval`: take one more interval step and widen it by
      `sound_widening`, so that it encloses the exact DEQ output for every
      input in the box whenever ``certifiable`` (for certification). With
      False, the computed interval fixed point as is (for training losses:
      the widening is a certificate margin, not a training signal), and
      ``certifiable`` is False.

  Returns:
    ``(z*, DEQStats)``; ``DEQStats.lipschitz`` is ``min(L, rho)``.
  """
  is_box = isinstance(injection, Interval)
  cell = interval_deq_cell if is_box else deq_cell
  # One batched solve (not a vmap of single solves: see `solvers.solve`).
  batch_fn = lambda theta, z: cell(theta, z, activation)
  if z0 is None:
    z0 = jax.tree_util.tree_map(jnp.zeros_like, injection)
  z, st = implicit.fixed_point(batch_fn, (kernel, injection), z0, solver, adjoint_solver,
                               batched=True, theta_axes=(None, 0))
  # Certificates of the kernel, not training signals (a reparametrised kernel
  # is differentiated through its own bound, in `reparam`).
  fixed = jax.lax.stop_gradient(kernel)
  lipschitz = abs_operator_bound(fixed)
  channel = channel_contraction(fixed)
  certifiable = jnp.zeros_like(st.converged)
  if is_box and sound:
    fz = batch_fn((kernel, injection), z)
    z, contraction = sound_widening(z, fz, fixed, lipschitz, channel)
    certifiable = st.converged & contraction
  certified = jnp.minimum(lipschitz, channel[1])
  stats = DEQStats(st.iterations, st.residual, st.converged,
                   jnp.broadcast_to(certified, st.residual.shape), certifiable)
  return z, stats
