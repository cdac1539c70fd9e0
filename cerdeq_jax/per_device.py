"""Per-sample work run per device: each device on its own slice of the batch.

Used where a loop iterates over a batch whose samples are independent (the
DEQ solves, the taps of a kernel gradient). Traced under a device mesh
(``jax.set_mesh``, ``jax.sharding.use_abstract_mesh``: the train and eval steps
do this; in a jit without one, the mesh of the batch's sharding), the loop then
runs inside ``jax.shard_map`` and holds no collective: over all axes of an
automatic mesh, over the axes the batch is sharded on for explicit axes.
Otherwise (no mesh, one device, a batch the automatic mesh does not divide or
that explicit axes replicate, manual axes, where the caller has laid out the
batch itself) the function runs as is.

Why no collective may sit in a loop: XLA:CPU runs a ``while`` loop
asynchronously and orders collectives only by when they start, so an
independent collective can run while the loop's own is in flight; gloo, which
pairs collectives by their order, then pairs the wrong ones across processes
(a 2-process run aborts or, with equal sizes, mixes values). On GPU/TPU a
per-device loop also saves one cross-device reduction per iteration.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

PyTree = Any


def _batch_axes(leaf) -> tuple:
  """The explicit mesh axes ``leaf``'s type shards its leading (batch) axis
  over; () where it is not sharded there."""
  spec = jax.typeof(leaf).sharding.spec
  axes = spec[0] if spec else None
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _split(in_axes: tuple, args: tuple):
  """``(mesh, batch axes, shard_map's in_specs argument)`` to run per device,
  or None to run as is.

  Automatic axes: the batch splits over all of them (if they divide it).
  Explicit axes: over those the batch is sharded on, read off its type, and
  shard_map infers every argument's spec (a replicated batch runs as is)."""
  batched = jax.tree_util.tree_leaves(
      [jax.tree_util.tree_map(lambda axis, sub: None if axis is None else sub, axes, arg,
                              is_leaf=lambda axis: axis is None)
       for axes, arg in zip(in_axes, args)])
  if not batched:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # a jit without a mesh in context: the batch's type may carry one
    mesh = jax.typeof(batched[0]).sharding.mesh
  if mesh.empty or AxisType.Manual in mesh.axis_types:
    return None
  if AxisType.Explicit in mesh.axis_types:  # even on one device: the types say 'sharded'
    axes = _batch_axes(batched[0])
    return (mesh, axes, {}) if axes else None
  if mesh.size == 1 or batched[0].shape[0] % mesh.size:
    return None
  axes = tuple(mesh.axis_names)
  return mesh, axes, {'in_specs': _specs(in_axes, P(axes))}


def _specs(in_axes: tuple, split: P) -> tuple:
  """vmap-style ``in_axes`` (per argument a prefix tree of 0 / None) as specs."""
  return tuple(jax.tree_util.tree_map(lambda axis: P() if axis is None else split, axes,
                                      is_leaf=lambda axis: axis is None)
               for axes in in_axes)


def _run(fn: Callable, in_axes: tuple, args: tuple, summed: bool):
  found = _split(in_axes, args)
  if found is None:
    return fn(*args)
  mesh, axes, specs = found
  body = (lambda *a: jax.lax.psum(fn(*a), axes)) if summed else fn
  # check_vma off: a loop's stopping test is per device on purpose. The jit
  # lets the compiler lay out eager inputs (a no-op inside a jit).
  return jax.jit(jax.shard_map(body, mesh=mesh, axis_names=set(axes), **specs,
                               out_specs=P() if summed else P(axes), check_vma=False))(*args)


def map_batch(fn: Callable, in_axes: tuple, *args):
  """``fn(*args)``, per device. ``in_axes`` (one per argument, like vmap's:
  0 where every leaf has the leading batch axis, None where it is shared, or
  a prefix tree of those); every leaf of the result has the batch axis."""
  return _run(fn, in_axes, args, summed=False)


def sum_batch(fn: Callable, in_axes: tuple, *args):
  """``fn(*args)`` where ``fn`` sums over the batch: per device it sums its own
  slice, and the devices' sums are added after ``fn`` (one all-reduce, outside
  any loop of ``fn``). The result is replicated."""
  return _run(fn, in_axes, args, summed=True)


def automatic_axes(fn: Callable, x, *args):
  """``fn(x, *args)``; when ``x`` (an array or a tree of arrays with a leading
  batch axis) is sharded over explicit mesh axes, with those axes automatic
  and every output sharded on its batch axis as ``x`` is. For products whose
  gradient sums over the batch: jax 0.10 has no explicit-sharding rule for a
  convolution's kernel gradient, a dense one's without a mesh in context, or
  a gather's scatter (a stock ``flax.linen.Conv`` fails there)."""
  leaf = jax.tree_util.tree_leaves(x)[0]
  if all(axis is None for axis in jax.typeof(leaf).sharding.spec):
    return fn(x, *args)
  out = NamedSharding(jax.typeof(leaf).sharding.mesh, P(_batch_axes(leaf) or None))
  return jax.sharding.auto_axes(fn, out_sharding=out)(x, *args)
