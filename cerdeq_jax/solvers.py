"""Fixed-point solvers for ``z = f(z)`` on any pytree state.

Solvers are small immutable objects with ``init``, ``step`` and ``terminate``
(in the style of optimistix); `solve` drives them with ``jax.lax.while_loop``
and returns statistics as data. A solver solves *one* problem; batch it with
``jax.vmap`` (which gives per-sample statistics and per-sample stopping).

The returned solution is ``f(z_k)`` for the last iterate ``z_k`` and the
reported absolute residual is ``||f(z_k) - z_k||_2``: for a contraction with
constant L this gives ``||f(z_k) - z*||_2 <= L / (1 - L) * residual``, which is
what `cerdeq_jax.deq` uses to make interval fixed points sound.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from cerdeq_jax.precision import CERTIFY

PyTree = Any


class SolverStats(NamedTuple):
  """Statistics of one solve.

  iterations: number of evaluations of ``f`` after the initial one.
  residual: relative residual ``||f(z) - z|| / (||f(z)|| + 1e-8)`` at the end.
  abs_residual: absolute residual ``||f(z) - z||_2`` (all leaves together).
  converged: ``residual <= tol``.
  """
  iterations: jax.Array
  residual: jax.Array
  abs_residual: jax.Array
  converged: jax.Array


def _tree_norm(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves))


def _tree_sub(a, b):
  return jax.tree_util.tree_map(jnp.subtract, a, b)


def _residuals(z, fz):
  abs_res = _tree_norm(_tree_sub(fz, z))
  return abs_res / (_tree_norm(fz) + 1e-8), abs_res


class PicardState(NamedTuple):
  z: PyTree
  fz: PyTree
  iteration: jax.Array
  residual: jax.Array
  abs_residual: jax.Array


@dataclasses.dataclass(frozen=True)
class Picard:
  """Picard iteration ``z <- (1 - damping) z + damping f(z)``."""
  tol: float = 1e-4
  max_iter: int = 50
  damping: float = 1.0

  def init(self, fn: Callable, z0: PyTree) -> PicardState:
    fz = fn(z0)
    rel, abs_res = _residuals(z0, fz)
    return PicardState(z0, fz, jnp.zeros((), jnp.int32), rel, abs_res)

  def step(self, fn: Callable, state: PicardState) -> PicardState:
    d = self.damping
    z = jax.tree_util.tree_map(lambda a, b: (1 - d) * a + d * b, state.z, state.fz)
    fz = fn(z)
    rel, abs_res = _residuals(z, fz)
    return PicardState(z, fz, state.iteration + 1, rel, abs_res)

  def terminate(self, state) -> jax.Array:
    return (state.residual <= self.tol) | (state.iteration >= self.max_iter)


class AndersonState(NamedTuple):
  z: PyTree
  fz: PyTree
  xs: jax.Array          # (memory, n): past iterates, flattened
  gs: jax.Array          # (memory, n): past residuals f(x) - x
  fxs: jax.Array         # (memory, n): past f(x)
  iteration: jax.Array
  residual: jax.Array
  abs_residual: jax.Array


@dataclasses.dataclass(frozen=True)
class Anderson:
  """Anderson acceleration (type II) with memory ``memory``.

  The mixing weights solve ``min ||sum_i a_i g_i||`` s.t. ``sum_i a_i = 1`` via
  the ridge-regularised Gram system ``(G G^T + ridge * tr/m I) a ∝ 1``. When that
  system gives non-finite weights (ill-conditioned Gram) the step falls back to
  a damped Picard step.
  """
  tol: float = 1e-4
  max_iter: int = 50
  memory: int = 5
  ridge: float = 1e-4
  mixing: float = 1.0

  def init(self, fn: Callable, z0: PyTree) -> AndersonState:
    fz = fn(z0)
    x, unravel = ravel_pytree(z0)
    fx, _ = ravel_pytree(fz)
    m = self.memory
    xs = jnp.zeros((m,) + x.shape, x.dtype).at[0].set(x)
    fxs = jnp.zeros((m,) + x.shape, x.dtype).at[0].set(fx)
    gs = jnp.zeros((m,) + x.shape, x.dtype).at[0].set(fx - x)
    rel, abs_res = _residuals(z0, fz)
    return AndersonState(z0, fz, xs, gs, fxs, jnp.zeros((), jnp.int32), rel, abs_res)

  def _weights(self, gs, count):
    m = self.memory
    valid = jnp.arange(m) < count
    gram = jnp.einsum('in,jn->ij', gs, gs, precision=CERTIFY)
    pair = valid[:, None] & valid[None, :]
    scale = jnp.trace(jnp.where(pair, gram, 0.0)) / jnp.maximum(count, 1) + 1e-30
    gram = jnp.where(pair, gram, 0.0) + jnp.diag(jnp.where(valid, self.ridge * scale, 1.0))
    a = jnp.linalg.solve(gram, valid.astype(gs.dtype))
    a = a / jnp.sum(a)
    return a, jnp.all(jnp.isfinite(a))

  def step(self, fn: Callable, state: AndersonState) -> AndersonState:
    m = self.memory
    _, unravel = ravel_pytree(state.z)
    count = jnp.minimum(state.iteration + 1, m)
    a, ok = self._weights(state.gs, count)
    newest = state.iteration % m
    picard = jax.nn.one_hot(newest, m, dtype=state.xs.dtype)
    a = jnp.where(ok, a, picard)
    beta = self.mixing
    # Full precision: the next iterate, hence the residual that decides
    # convergence, is this product (bf16/TF32 would stall it near 1e-3).
    mix = lambda rows: jnp.matmul(a, rows, precision=CERTIFY)
    x_new = beta * mix(state.fxs) + (1 - beta) * mix(state.xs)
    z = unravel(x_new)
    fz = fn(z)
    fx, _ = ravel_pytree(fz)
    slot = (state.iteration + 1) % m
    rel, abs_res = _residuals(z, fz)
    return AndersonState(
        z, fz, state.xs.at[slot].set(x_new), state.gs.at[slot].set(fx - x_new),
        state.fxs.at[slot].set(fx), state.iteration + 1, rel, abs_res)

  def terminate(self, state) -> jax.Array:
    return (state.residual <= self.tol) | (state.iteration >= self.max_iter)


Solver = Picard | Anderson


def solve(fn: Callable[[PyTree], PyTree], z0: PyTree, solver: Solver) -> tuple[PyTree, SolverStats]:
  """Solves ``z = fn(z)`` from ``z0`` with ``jax.lax.while_loop``.

  ``fn`` may close over traced values; it is not differentiated through (use
  `cerdeq_jax.implicit.fixed_point` for gradients).

  Returns:
    ``(fn(z_k), SolverStats)`` for the last iterate ``z_k``.
  """
  state = jax.lax.while_loop(lambda s: ~solver.terminate(s),
                             lambda s: solver.step(fn, s),
                             solver.init(fn, z0))
  stats = SolverStats(state.iteration, state.residual, state.abs_residual,
                      state.residual <= solver.tol)
  return state.fz, stats
