"""Implicit differentiation of fixed points (a ``jax.custom_vjp``).

For ``z* = f(theta, z*)`` the cotangent ``g_bar`` of ``z*`` is pulled back by
solving the adjoint fixed point ``g = (df/dz)^T g + g_bar`` (with the same kind
of solver, again a ``while_loop``) and returning ``(df/dtheta)^T g``. Nothing of
the forward iterations is stored: the memory of a gradient does not depend on
the number of iterations.

A batch of independent problems traced under a device mesh (``jax.set_mesh``,
``jax.sharding.use_abstract_mesh``) is solved per device: each device runs its own loops on its slice of the
batch (``jax.shard_map``), so that no collective runs inside a solver loop.
Each sample stops on its own (`solvers.solve`), so this changes no result; it
saves a cross-device reduction per iteration, and it avoids an XLA:CPU race:
there, a ``while`` loop runs asynchronously and an independent collective may
start while the loop's own per-iteration all-reduce is in flight, and gloo
(which matches collectives by order) pairs the wrong ones across processes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from cerdeq_jax import solvers

PyTree = Any


def _per_device(fn: Callable, theta_axes: PyTree, theta: PyTree, *batched_args):
  """``fn(theta, *batched_args)``, run on each device's slice of the batch when
  a mesh is in context and its size divides the batch; else as is.

  ``theta_axes`` (a prefix of ``theta``, as vmap's ``in_axes``: 0 for leaves
  with the leading batch axis, None for shared ones); every leaf of
  ``batched_args`` and of the result has the leading batch axis."""
  mesh = jax.sharding.get_abstract_mesh()
  # Only over automatic axes: inside a shard_map (manual) or under explicit
  # sharding, the caller has laid out the batch itself.
  if (theta_axes is None or mesh.empty or mesh.size == 1
      or jax.tree_util.tree_leaves(batched_args)[0].shape[0] % mesh.size
      or any(t != AxisType.Auto for t in mesh.axis_types)):
    return fn(theta, *batched_args)
  split = P(tuple(mesh.axis_names))
  theta_specs = jax.tree_util.tree_map(lambda axis: P() if axis is None else split,
                                       theta_axes, is_leaf=lambda axis: axis is None)
  # check_vma off: the loops' stopping tests are per device on purpose. The
  # jit lets the compiler lay out eager inputs (a no-op inside a jit).
  return jax.jit(jax.shard_map(fn, mesh=mesh, out_specs=split, check_vma=False,
                               in_specs=(theta_specs,) + (split,) * len(batched_args)))(
                                   theta, *batched_args)


def _forward(fn, solver, batched, theta_axes, theta, z0):
  solve = lambda theta, z0: solvers.solve(lambda z: fn(theta, z), z0, solver, batched)
  return _per_device(solve, theta_axes if batched else None, theta, z0)


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

  g = _per_device(adjoint, theta_axes if batched else None, theta, z, z_bar)
  # Outside the per-device map: shared parameters sum their gradient over the batch.
  _, vjp_theta = jax.vjp(lambda t: fn(t, z), theta)
  (theta_bar,) = vjp_theta(g)
  return theta_bar, jax.tree_util.tree_map(jnp.zeros_like, z)


fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)
