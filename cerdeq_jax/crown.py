"""CROWN and CROWN-IBP bounds (Zhang et al. 2018; 2020) on the graph of a model.

A lower bound of ``sum(A * z_out)`` is propagated backwards as linear
coefficients: through an affine node ``A -> linear^T A`` (the VJP of the
layer's linear map, over all specification rows at once) plus ``<A, bias>``;
through a ReLU with pre-activation bounds ``[l, u]`` by its linear relaxation
(exact where the neuron is stable; on unstable ones the upper line through
``(l, 0)`` and ``(u, u)``, the lower line ``alpha z`` with ``alpha`` 1 if
``u > -l`` else 0, CROWN's adaptive rule); through an add to both inputs.
At a leaf (the input, or a DEQ's output box) the coefficients are concretised
against its box: ``<A, centre> - <|A|, radius>``. Every step is a valid
inequality for every point of the leaves' boxes, so the result is a sound
lower bound whatever the pre-activation bounds are, as long as they hold.

* **CROWN-IBP**: pre-activation bounds from IBP (the boxes recorded by
  `graph.trace`), one backward pass from the margin specification.
* **CROWN**: every pre-activation bound by its own backward pass (identity
  specification, in chunks of rows), intersected with IBP's (both hold).
  Its cost grows with depth times width; ``max_neurons`` keeps IBP bounds for
  wider layers.

Margins are lower bounds of ``logit_y - logit_j`` ``(N, K)``, 0 at ``j = y``,
like `ibp.elided_margins`; the specification rows are ``e_y - e_j``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cerdeq_jax import graph as G
from cerdeq_jax.interval import Interval
from cerdeq_jax.layers import clean_pass_collections

#: Elements of one coefficient tensor in a chunk of intermediate-bound rows
#: (float32: 256 MiB).
CHUNK_ELEMENTS = 2 ** 26
LOWER_SLOPES = ('adaptive', 'zero', 'one')


class Relaxation(NamedTuple):
  """Linear bounds ``lower_slope * z <= relu(z) <= upper_slope * z + upper_intercept``
  valid on ``[l, u]``, element-wise."""
  lower_slope: jax.Array
  upper_slope: jax.Array
  upper_intercept: jax.Array


def relu_relaxation(bounds: Interval, lower_slope: str = 'adaptive') -> Relaxation:
  """CROWN's ReLU relaxation. ``lower_slope``: 'adaptive' (1 if ``u > -l``,
  i.e. the smaller area), 'zero' or 'one' on unstable neurons."""
  l, u = bounds.lower, bounds.upper
  active, inactive = l >= 0, u <= 0
  unstable = ~(active | inactive)
  # Only unstable neurons divide; elsewhere the denominator is a harmless 1
  # (a bare where would still differentiate u / 0).
  denominator = jnp.where(unstable, u - l, 1.0)
  chord = jnp.where(unstable, u, 0.0) / denominator
  one = jnp.ones_like(l)
  upper_slope = jnp.where(active, one, chord)
  upper_intercept = -chord * jnp.where(unstable, l, 0.0)
  alpha = {'adaptive': (u > -l).astype(l.dtype), 'zero': jnp.zeros_like(l), 'one': one}[lower_slope]
  lower = jnp.where(active, one, jnp.where(unstable, alpha, 0.0))
  return Relaxation(jax.lax.stop_gradient(lower), upper_slope, upper_intercept)


def _inner(a, b) -> jax.Array:
  """``(N, S, ...) x (N or 1, ...) -> (N, S)``: sum over the feature axes."""
  b = jnp.broadcast_to(b, (a.shape[0],) + a.shape[2:])[:, None]
  return jnp.sum(a * b, axis=tuple(range(2, a.ndim)))


def _transpose(linear, a, in_shape) -> jax.Array:
  """``linear^T`` applied to every row of ``a`` ``(N, S, *out)`` -> ``(N, S, *in)``.

  Every affine node is the same map for every sample, so the ``N * S`` rows are
  one batch of cotangents of ``linear`` (its VJP, at 0: it is linear)."""
  n, s = a.shape[:2]
  zeros = jnp.zeros((n * s,) + tuple(in_shape[1:]), a.dtype)
  _, vjp = jax.vjp(linear, zeros)
  return vjp(a.reshape((n * s,) + a.shape[2:]))[0].reshape((n, s) + tuple(in_shape[1:]))


def _concretise(a, box: Interval) -> jax.Array:
  """Minimum of ``sum(a * z)`` over the box: ``<a, c> - <|a|, r>``."""
  return _inner(a, box.centre) - _inner(jnp.abs(a), box.radius)


def backward(graph: G.Graph, node: int, coeffs, pre_bounds: dict, lower_slope='adaptive'):
  """Lower bound of ``sum(coeffs * z_node)`` over the leaves' boxes.

  Args:
    graph: from `graph.trace` (with boxes on the leaves).
    node: index of the node bounded.
    coeffs: ``(N, S, *shape of the node)``, S specification rows.
    pre_bounds: ReLU node index -> `Interval` of its input (pre-activation).

  Returns:
    ``(N, S)`` lower bounds.
  """
  pending = {node: coeffs}
  bound = jnp.zeros(coeffs.shape[:2], coeffs.dtype)
  for i in range(node, -1, -1):
    if i not in pending:
      continue
    a, n = pending.pop(i), graph.nodes[i]

    def push(j, c):
      pending[j] = pending[j] + c if j in pending else c

    if n.kind == G.AFFINE:
      if n.bias is not None:
        bound = bound + _inner(a, n.bias)
      src = n.inputs[0]
      push(src, _transpose(n.linear, a, graph.nodes[src].value.shape))
    elif n.kind == G.RELU:
      r = relu_relaxation(pre_bounds[i], lower_slope)
      pos, neg = jnp.maximum(a, 0), jnp.minimum(a, 0)
      bound = bound + _inner(neg, r.upper_intercept)
      push(n.inputs[0], pos * r.lower_slope[:, None] + neg * r.upper_slope[:, None])
    elif n.kind == G.ADD:
      for j in n.inputs:
        push(j, a)
    elif n.kind in (G.INPUT, G.CUT):
      if n.box is None:
        raise ValueError('CROWN needs the graph traced with a box.')
      bound = bound + _concretise(a, n.box)
    else:
      raise ValueError(f'unknown node kind {n.kind!r}')
  return bound


def ibp_pre_bounds(graph: G.Graph) -> dict:
  """CROWN-IBP: every ReLU's pre-activation bounds are its IBP box."""
  return {i: graph.nodes[n.inputs[0]].box for i, n in enumerate(graph.nodes) if n.kind == G.RELU}


def node_bounds(graph: G.Graph, node: int, pre_bounds: dict, lower_slope='adaptive',
                chunk_elements: int = CHUNK_ELEMENTS) -> Interval:
  """CROWN bounds of every element of a node (lower and upper, identity
  specification), computed in chunks of rows so that a coefficient tensor
  holds at most ``chunk_elements`` numbers."""
  shape = graph.nodes[node].value.shape
  n, m = shape[0], math.prod(shape[1:])
  widest = max(math.prod(x.value.shape[1:]) for x in graph.nodes[:node + 1])
  rows = max(1, min(m, chunk_elements // (2 * n * widest)))
  chunks = -(-m // rows)
  dtype = graph.nodes[node].value.dtype

  def chunk(start):
    eye = jax.nn.one_hot(start + jnp.arange(rows), m, dtype=dtype)  # rows past m are 0
    spec = jnp.concatenate([eye, -eye]).reshape((1, 2 * rows) + shape[1:])
    lb = backward(graph, node, jnp.broadcast_to(spec, (n,) + spec.shape[1:]), pre_bounds,
                  lower_slope)
    return lb[:, :rows], -lb[:, rows:]

  lo, up = jax.lax.map(chunk, jnp.arange(chunks) * rows)  # (chunks, N, rows)
  flat = lambda b: jnp.moveaxis(b, 0, 1).reshape(n, chunks * rows)[:, :m].reshape(shape)
  return Interval(flat(lo), flat(up))


def crown_pre_bounds(graph: G.Graph, max_neurons: int | None = None, lower_slope='adaptive',
                     chunk_elements: int = CHUNK_ELEMENTS) -> dict:
  """Full CROWN: each ReLU's pre-activation bounds by CROWN (in forward order,
  each pass using the bounds found before it), intersected with IBP.

  Layers with more than ``max_neurons`` neurons per sample, and those affine
  in the leaves (IBP is exact there), keep their IBP bounds. ``fmax``/``fmin``
  ignore a NaN CROWN bound (e.g. from an infinite DEQ box): IBP's stands."""
  pre = {}
  for i, n in enumerate(graph.nodes):
    if n.kind != G.RELU:
      continue
    p = n.inputs[0]
    box = graph.nodes[p].box
    size = math.prod(box.shape[1:])
    if graph.relu_ancestor(p) and (max_neurons is None or size <= max_neurons):
      crown = node_bounds(graph, p, pre, lower_slope, chunk_elements)
      box = Interval(jnp.fmax(box.lower, crown.lower), jnp.fmin(box.upper, crown.upper))
    pre[i] = box
  return pre


def margin_spec(labels, num_classes: int, dtype=jnp.float32) -> jax.Array:
  """``C[n, j] = e_{y_n} - e_j`` ``(N, K, K)`` (the row ``j = y_n`` is 0)."""
  eye = jnp.eye(num_classes, dtype=dtype)
  return eye[labels][:, None, :] - eye[None]


def margins(graph: G.Graph, labels, pre_bounds: dict, lower_slope='adaptive') -> jax.Array:
  """Lower bounds of ``logit_y - logit_j`` ``(N, K)``, 0 at ``j = y``."""
  out = graph.nodes[graph.output].value
  spec = margin_spec(labels, out.shape[-1], out.dtype)
  lb = backward(graph, graph.output, spec, pre_bounds, lower_slope)
  return jnp.where(jax.nn.one_hot(labels, out.shape[-1], dtype=bool), 0.0, lb)


class Bounds(NamedTuple):
  """Clean ``logits`` and margin lower bounds by IBP and by CROWN(-IBP), all ``(N, K)``."""
  logits: jax.Array
  ibp: jax.Array
  crown: jax.Array


def clean_and_bounds(model, variables, x, box: Interval, labels, train: bool, mutable=(),
                     intermediate: str = 'ibp', max_neurons: int | None = None,
                     lower_slope: str = 'adaptive'):
  """One ``apply`` that traces the model on the clean batch and its box
  (`training.clean_and_bounds`'s contract) and bounds the margins.

  ``intermediate``: 'ibp' (CROWN-IBP) or 'crown' (full CROWN, with
  ``max_neurons``). Returns ``(Bounds, collections)``.
  """
  if intermediate not in ('ibp', 'crown'):
    raise ValueError(f"intermediate must be 'ibp' or 'crown', got {intermediate!r}.")
  if lower_slope not in LOWER_SLOPES:
    raise ValueError(f'lower_slope must be one of {LOWER_SLOPES}, got {lower_slope!r}.')

  def run(module, x, box, labels):
    g, logits = G.trace(module, x, box, labels, train=train)
    pre = (ibp_pre_bounds(g) if intermediate == 'ibp'
           else crown_pre_bounds(g, max_neurons, lower_slope))
    return Bounds(logits, g.margins, margins(g, labels, pre, lower_slope))

  return model.apply(variables, x, box, labels, method=run,
                     mutable=list(mutable) + clean_pass_collections(train))


def mixed_margins(bounds: Bounds, beta) -> jax.Array:
  """CROWN-IBP's training bound ``beta * crown + (1 - beta) * ibp``."""
  return beta * bounds.crown + (1 - beta) * bounds.ibp
