"""Implicit differentiation of fixed points (a ``jax.custom_vjp``).

For ``z* = f(theta, z*)`` the cotangent ``g_bar`` of ``z*`` is pulled back by
solving the adjoint fixed point ``g = (df/dz)^T g + g_bar`` (with the same kind
of solver, again a ``while_loop``) and returning ``(df/dtheta)^T g``. Nothing of
the forward iterations is stored: the memory of a gradient does not depend on
the number of iterations.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cerdeq_jax import solvers

PyTree = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def fixed_point(fn: Callable[[PyTree, PyTree], PyTree], theta: PyTree, z0: PyTree,
                solver: solvers.Solver, adjoint_solver: solvers.Solver | None = None,
                batched: bool = False):
  """Solves ``z = fn(theta, z)`` from ``z0``; differentiable w.r.t. ``theta``.

  Args:
    fn: a pure function ``(theta, z) -> z`` that closes over no traced values
      (pass every array it needs through ``theta``).
    theta: parameters and inputs (any pytree).
    z0: initial state (any pytree; receives a zero gradient).
    solver: forward solver, e.g. `solvers.Anderson()`.
    adjoint_solver: solver of the backward fixed point (default: ``solver``).
    batched: ``z0`` holds a batch of independent problems along axis 0 and
      ``fn`` treats each sample on its own (see `solvers.solve`); then both
      solves stop per sample.

  Returns:
    ``(z, SolverStats)``.
  """
  return solvers.solve(lambda z: fn(theta, z), z0, solver, batched)


def _fixed_point_fwd(fn, theta, z0, solver, adjoint_solver, batched):
  z, stats = solvers.solve(lambda z: fn(theta, z), z0, solver, batched)
  return (z, stats), (z, theta)  # z0 only for its zero cotangent: z has its shapes


def _fixed_point_bwd(fn, solver, adjoint_solver, batched, residuals, cotangents):
  z, theta = residuals
  z_bar, _ = cotangents  # statistics carry no gradient
  _, vjp_z = jax.vjp(lambda state: fn(theta, state), z)
  adjoint_map = lambda g: jax.tree_util.tree_map(jnp.add, vjp_z(g)[0], z_bar)
  g, _ = solvers.solve(adjoint_map, z_bar, adjoint_solver or solver, batched)
  _, vjp_theta = jax.vjp(lambda t: fn(t, z), theta)
  (theta_bar,) = vjp_theta(g)
  return theta_bar, jax.tree_util.tree_map(jnp.zeros_like, z)


fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)
