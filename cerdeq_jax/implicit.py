"""Implicit differentiation of fixed points (a ``jax.custom_vjp``).

For ``z* = f(theta, z*)`` the cotangent ``g_bar`` of ``z*`` is pulled back by
solving the adjoint fixed point ``g = (df/dz)^T g + g_bar`` (with the same kind
of solver, again a ``while_loop``) and returning ``(df/dtheta)^T g``. Nothing of
the forward iterations is stored: the memory of a gradient does not depend on
the number of iterations.

A batch of independent problems is solved per device when traced under a
device mesh (`cerdeq_jax.per_device`): no collective then runs inside a solver
loop. Each sample stops on its own (`solvers.solve`), so this changes no result.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cerdeq_jax import per_device, solvers

PyTree = Any


def _on_batch(batched, theta_axes, solve, theta, *states):
  """``solve(theta, *states)``, per device where the batch allows it."""
  if not batched or theta_axes is None:
    return solve(theta, *states)
  return per_device.map_batch(solve, (theta_axes,) + (0,) * len(states), theta, *states)


def _forward(fn, solver, batched, theta_axes, theta, z0):
  solve = lambda theta, z0: solvers.solve(lambda z: fn(theta, z), z0, solver, batched)
  return _on_batch(batched, theta_axes, solve, theta, z0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5, 6))
def fixed_point(fn: Callable[[PyTree, PyTree], PyTree], theta: PyTree, z0: PyTree,
                solver: solvers.Solver, adjoint_solver: solvers.Solver | None = None,
                batched: bool = False, theta_axes: PyTree = None):
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
    theta_axes: with ``batched``, which leaves of ``theta`` carry the batch
      axis (a prefix of ``theta`` as vmap's ``in_axes``: 0 or None, e.g.
      ``(None, 0)`` for ``(kernel, injection)``). Given, and under a mesh in
      context, each device solves its own slice of the batch (module
      docstring); a tuple, since it must be hashable.

  Returns:
    ``(z, SolverStats)``.
  """
  return _forward(fn, solver, batched, theta_axes, theta, z0)


def _fixed_point_fwd(fn, theta, z0, solver, adjoint_solver, batched, theta_axes):
  z, stats = _forward(fn, solver, batched, theta_axes, theta, z0)
  return (z, stats), (z, theta)  # z0 only for its zero cotangent: z has its shapes


def _fixed_point_bwd(fn, solver, adjoint_solver, batched, theta_axes, residuals, cotangents):
  z, theta = residuals
  z_bar, _ = cotangents  # statistics carry no gradient

  def adjoint(theta, z, z_bar):
    _, vjp_z = jax.vjp(lambda state: fn(theta, state), z)
    adjoint_map = lambda g: jax.tree_util.tree_map(jnp.add, vjp_z(g)[0], z_bar)
    return solvers.solve(adjoint_map, z_bar, adjoint_solver or solver, batched)[0]

  g = _on_batch(batched, theta_axes, adjoint, theta, z, z_bar)
  # Outside the per-device map: shared parameters sum their gradient over the batch.
  _, vjp_theta = jax.vjp(lambda t: fn(t, z), theta)
  (theta_bar,) = vjp_theta(g)
  return theta_bar, jax.tree_util.tree_map(jnp.zeros_like, z)


fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)
