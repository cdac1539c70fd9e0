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

# Relative safety margin on the float32 SVD of S (its relative error is ~1e-6).
_NORM_SAFETY = 1.0 + 1e-4


class DEQStats(NamedTuple):
  """Per-sample statistics of a DEQ solve (leading batch dimension).

  certifiable: the solve converged and L < 1, so the (widened) interval
    bounds are sound for the exact fixed point. Always False for arrays.
  """
  iterations: jax.Array
  residual: jax.Array
  converged: jax.Array
  lipschitz: jax.Array
  certifiable: jax.Array


def abs_operator_bound(kernel) -> jax.Array:
  """Upper bound L on ``|| |W| ||_2`` for the convolution (or dense map) W.

  For an HWIO kernel K, ``S[o, i] = sum_{h,w} |K[h, w, i, o]|`` and
  ``|| |W| ||_2 <= ||S||_2`` for zero padding and any input size (equality for
  circular padding): a non-negative kernel's symbol peaks at frequency 0, and
  zero padding compresses the circular operator. A dense ``(D_in, D_out)``
  kernel gives ``||abs(K)^T||_2`` exactly. Since ``||W||_2 <= || |W| ||_2`` the
  bound also makes the nominal DEQ contractive.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  s = jnp.sum(jnp.abs(kernel.reshape((-1,) + kernel.shape[-2:])), axis=0)  # (I, O)
  return jnp.linalg.norm(s, ord=2) * _NORM_SAFETY


# --- cells: pure functions of (theta, z); theta = (hidden_kernel, injection) ---

def deq_cell(theta, z, activation: Callable = jax.nn.relu):
  """One DEQ step for one sample ``z: (H, W, C)``; injection = U x + b."""
  kernel, injection = theta
  return activation(ops.same_conv(z[None], kernel)[0] + injection)


def interval_deq_cell(theta, z: Interval, activation: Callable = jax.nn.relu) -> Interval:
  """IBP of one DEQ step; injection is the interval of U x + b (two convs)."""
  kernel, injection = theta
  pre = ibp.linear_map(
      Interval(z.lower[None], z.upper[None]),
      lambda c: ops.same_conv(c, kernel), lambda r: ops.same_conv(r, jnp.abs(kernel)))
  pre = Interval(pre.lower[0] + injection.lower, pre.upper[0] + injection.upper)
  return ibp.monotone(pre, activation)


def solve_deq(kernel, injection, solver: solvers.Solver,
              adjoint_solver: solvers.Solver | None = None,
              activation: Callable = jax.nn.relu, z0=None):
  """Fixed points of ``z = σ(W z + injection)`` for a batch.

  Args:
    kernel: hidden HWIO kernel ``(k, k, C, C)`` (stride 1, SAME).
    injection: ``U x + b``, ``(N, H, W, C)`` array or `Interval`.
    solver: forward solver; adjoint_solver: backward solver.
    z0: initial state (default zeros, or [0, 0] for an interval).

  Returns:
    ``(z*, DEQStats)``. For an `Interval` injection z* is the interval fixed
    point widened by ``L/(1-L) * ||f(z_k) - z_k||_2`` per sample, so it encloses
    the exact DEQ output for every input in the box whenever ``certifiable``.
  """
  is_box = isinstance(injection, Interval)
  cell = interval_deq_cell if is_box else deq_cell
  fn = lambda theta, z: cell(theta, z, activation)
  if z0 is None:
    z0 = jax.tree_util.tree_map(jnp.zeros_like, injection)
  solve_one = lambda inj, init: implicit.fixed_point(fn, (kernel, inj), init, solver,
                                                     adjoint_solver)
  z, st = jax.vmap(solve_one)(injection, z0)
  lipschitz = abs_operator_bound(kernel)
  if is_box:
    contraction = lipschitz < 1
    # The widening is a certificate margin, not a training signal. Without a
    # contraction nothing is known: widen to infinity (select, not multiply:
    # inf * a zero residual would be NaN).
    delta = jax.lax.stop_gradient(
        jnp.where(contraction, lipschitz / (1 - lipschitz) * st.abs_residual, jnp.inf))
    delta = delta.reshape((-1,) + (1,) * (z.lower.ndim - 1))
    z = Interval(z.lower - delta, z.upper + delta)
    certifiable = st.converged & contraction
  else:
    certifiable = jnp.zeros_like(st.converged)
  stats = DEQStats(st.iterations, st.residual, st.converged,
                   jnp.broadcast_to(lipschitz, st.residual.shape), certifiable)
  return z, stats
