"""The graph of a Linen model for linear bound propagation (CROWN).

CROWN needs what IBP never needs: the network's layers as *operators* it can run
backwards. `trace` obtains them from any Linen model built from
`cerdeq_jax.layers`, without the model's cooperation: it calls the model once on
a `Traced` input and intercepts every certified layer
(`flax.linen.intercept_methods`). An intercepted layer runs as usual on the
clean array and is recorded as a `Node`; then the model runs as usual on the
IBP box (so BatchNorm moments, sown pre-activations and DEQ statistics are
those of `training.clean_and_bounds`), and each layer's output box is matched to
its node by module path and call order:

* ``AFFINE``: ``z -> linear(z) + bias`` with ``linear`` a per-sample linear map
  of a batch (dense, conv, BatchNorm with fixed moments, average pooling,
  flatten, the classifier), closed over the layer's parameters;
* ``RELU``; ``ADD`` (`layers.add`, i.e. ``Traced + Traced``);
* ``INPUT`` and ``CUT`` (a DEQ: its output box, IBP through the DEQ, is where a
  backward pass stops).

Anything else (max pooling, non-ReLU activations) raises ``NotImplementedError``
naming the layer; a stock Flax layer refuses the `Traced` value with a
``TypeError``. Composite modules (the models, blocks, your own) are entered.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

from cerdeq_jax import ibp, layers, ops
from cerdeq_jax.interval import Interval

INPUT, AFFINE, RELU, ADD, CUT = 'input', 'affine', 'relu', 'add', 'cut'


class Node(NamedTuple):
  """One recorded operation. ``value``: clean output ``(N, ...)``; ``box``: its
  IBP bounds (None when traced without a box); ``linear``/``bias`` for AFFINE
  nodes (``bias`` broadcastable to the output, or None); ``name``: module path."""
  kind: str
  inputs: tuple[int, ...]
  value: jax.Array
  box: Interval | None
  linear: Callable | None = None
  bias: jax.Array | None = None
  name: str = ''


class Graph:
  """Nodes in call order (a topological order). ``output``: the classifier's
  node; ``margins``: its IBP margin lower bounds ``(N, K)`` (when traced with a
  box and labels)."""

  def __init__(self):
    self.nodes: list[Node] = []
    self.output: int | None = None
    self.margins: jax.Array | None = None

  def record(self, node: Node) -> 'Traced':
    self.nodes.append(node)
    return Traced(self, len(self.nodes) - 1)

  def relu_ancestor(self, node: int) -> bool:
    """Whether a backward pass from ``node`` meets a ReLU (else it is affine
    in the leaves, and IBP is already exact for it)."""
    seen, stack = set(), [node]
    while stack:
      i = stack.pop()
      if i in seen:
        continue
      seen.add(i)
      n = self.nodes[i]
      if n.kind == RELU:
        return True
      if n.kind not in (INPUT, CUT):
        stack.extend(n.inputs)
    return False


def _refusal() -> str:
  return ('a cerdeq_jax.graph.Traced value (a model being traced for CROWN) reached an operation '
          'without a CROWN rule: use the certified layers of cerdeq_jax.layers (Dense, Conv, '
          'BatchNorm, ReLU, AvgPool, Flatten, ElidedDense, DEQ) and layers.add.')


class Traced:
  """The value flowing through a model during `trace`: a handle on a node."""
  __slots__ = ('graph', 'node')

  def __init__(self, graph: Graph, node: int):
    self.graph, self.node = graph, node

  value = property(lambda self: self.graph.nodes[self.node].value)
  box = property(lambda self: self.graph.nodes[self.node].box)
  shape = property(lambda self: self.value.shape)
  ndim = property(lambda self: self.value.ndim)
  dtype = property(lambda self: self.value.dtype)

  @property
  def __jax_array__(self):  # see Interval: refuse to be taken for an array
    raise TypeError(_refusal())

  def __array__(self, dtype=None, copy=None):
    raise TypeError(_refusal())

  def __add__(self, other):
    """The residual add of `layers.add`."""
    if not isinstance(other, Traced) or other.graph is not self.graph:
      raise TypeError(_refusal())
    box = None if self.box is None else ibp.add(self.box, other.box)
    return self.graph.record(Node(ADD, (self.node, other.node), self.value + other.value, box))

  __radd__ = __add__


def _affine(linear_of: Callable):
  """A rule for an affine layer; ``linear_of(module, rest, kwargs)`` returns
  ``(linear, bias)`` from the module's variables after its call."""
  def rule(graph, module, next_fun, t, rest, kwargs):
    value = next_fun(t.value, *rest, **kwargs)
    linear, bias = linear_of(module, rest, kwargs)
    return graph.record(Node(AFFINE, (t.node,), value, None, linear, bias, _path(module)))
  return rule


def _dense(module, rest, kwargs):
  del rest, kwargs
  p = module.variables['params']
  kernel = p['kernel']
  return (lambda z: ops.dense(z, kernel)), p.get('bias')


def _conv(module, rest, kwargs):
  del rest, kwargs
  p = module.variables['params']
  return (ops.conv_op(p['kernel'], module.strides, module.padding, module.feature_group_count),
          p.get('bias'))


def _batch_norm(module, rest, kwargs):
  use_running_average = nn.merge_param(
      'use_running_average', module.use_running_average,
      kwargs.get('use_running_average', rest[0] if rest else None))
  collection = 'batch_stats' if use_running_average else layers.BATCH_MOMENTS
  if collection not in module.variables:
    raise ValueError(f'CROWN through BatchNorm in training mode needs the clean batch moments: '
                     f"make '{layers.BATCH_MOMENTS}' mutable.")
  p, stats = module.variables['params'], module.variables[collection]
  mul, shift = layers.batch_norm_affine(p['scale'], p['bias'], stats['mean'], stats['var'],
                                        module.epsilon)
  return (lambda z: z * mul), shift


def _pool(module, rest, kwargs):
  del rest, kwargs
  if module.pool is not nn.avg_pool:
    raise NotImplementedError(
        f'CROWN has no rule for {_path(module)} (pooling by {module.pool.__name__}): only '
        f'average pooling is linear; max pooling needs a relaxation this library does not have.')
  window, strides = tuple(module.window), module.strides and tuple(module.strides)
  return (lambda z: nn.avg_pool(z, window, strides, module.padding)), None


def _flatten(module, rest, kwargs):
  del module, rest, kwargs
  return (lambda z: z.reshape(z.shape[0], -1)), None


def _relu(graph, module, next_fun, t, rest, kwargs):
  if module.fn is not jax.nn.relu:
    raise NotImplementedError(f'CROWN has no rule for the activation {module.fn!r} of '
                              f'{_path(module)}: only ReLU is relaxed.')
  value = next_fun(t.value, *rest, **kwargs)
  return graph.record(Node(RELU, (t.node,), value, None, name=_path(module)))


def _classifier(graph, module, next_fun, t, rest, kwargs):
  """The elided classifier: a dense node (its box call gives the margins)."""
  del rest, kwargs
  value = next_fun(t.value)
  out = graph.record(Node(AFFINE, (t.node,), value, None, *_dense(module, (), {}),
                          name=_path(module)))
  graph.output = out.node
  return out


def _deq(graph, module, next_fun, t, rest, kwargs):
  """A DEQ is a cut: IBP through it (sound in strict mode), CROWN after it."""
  value = next_fun(t.value, *rest, **kwargs)
  return graph.record(Node(CUT, (t.node,), value, None, name=_path(module)))


_RULES = {layers.Dense: _affine(_dense), layers.Conv: _affine(_conv),
          layers.BatchNorm: _affine(_batch_norm), layers.Pool: _affine(_pool),
          layers.Flatten: _affine(_flatten), layers.Activation: _relu,
          layers.ElidedDense: _classifier, layers.DEQ: _deq}


def _path(module) -> str:
  return '/'.join(module.path) or type(module).__name__


def _interceptor(graph: Graph):
  def intercept(next_fun, args, kwargs, context):
    if context.method_name != '__call__' or not args or not isinstance(args[0], Traced):
      return next_fun(*args, **kwargs)
    cls = type(context.module)
    rule = _RULES.get(cls)
    if rule is not None:
      return rule(graph, context.module, next_fun, args[0], args[1:], kwargs)
    # A leaf of this library without a rule must not be entered: its interval
    # code would see a Traced value as an array.
    if cls.__module__.startswith('cerdeq_jax.') and not cls.__module__.startswith(
        'cerdeq_jax.models'):
      raise NotImplementedError(f'CROWN has no rule for {cls.__name__} ({_path(context.module)}).')
    return next_fun(*args, **kwargs)  # a composite module: trace through it
  return intercept


def _box_recorder(boxes: dict):
  """Records the output of every layer with a rule called on an `Interval`,
  under its module path (a list: a shared layer is called more than once)."""
  def intercept(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == '__call__' and type(context.module) in _RULES and args
        and isinstance(args[0], Interval)):
      boxes.setdefault(_path(context.module), []).append(out)
    return out
  return intercept


def _attach_boxes(graph: Graph, boxes: dict) -> None:
  """Gives every node its IBP box: a layer's recorded output (in call order per
  module path), the sum for an add; the classifier's output is the margins."""
  for i, n in enumerate(graph.nodes):
    if n.kind == INPUT:
      continue
    if n.kind == ADD:
      box = ibp.add(graph.nodes[n.inputs[0]].box, graph.nodes[n.inputs[1]].box)
    else:
      recorded = boxes.get(n.name) or []
      if not recorded:
        raise ValueError(f'trace: no interval output recorded for {n.name}: the model took a '
                         f'different path for the box than for the array.')
      box = recorded.pop(0)
    if i == graph.output:
      graph.margins, box = box, None
    graph.nodes[i] = n._replace(box=box)


def trace(module: nn.Module, x, box: Interval | None = None, labels=None,
          **call_kwargs) -> tuple[Graph, Any]:
  """Records the graph of a *bound* module (call it inside ``apply``).

  The model is called as ``module(traced_x, **call_kwargs)`` (e.g. ``train=``),
  then, with a box, as ``module(box, labels=labels, **call_kwargs)``: the calls
  of `training.clean_and_bounds`. It must end in `layers.ElidedDense`.

  Args:
    x: clean input ``(N, ...)``.
    box: its `Interval`, or None (no boxes: values and operators only).
    labels: ``(N,)`` int, needed with a box.

  Returns:
    ``(graph, logits)``; with a box, every node has its IBP box and
    ``graph.margins`` the model's IBP margin lower bounds ``(N, K)``.
  """
  graph = Graph()
  t = graph.record(Node(INPUT, (), x, box, name='input'))
  with nn.intercept_methods(_interceptor(graph)):
    out = module(t, **call_kwargs)
  if not isinstance(out, Traced) or graph.output is None or out.node != graph.output:
    raise ValueError('trace: the model must end in layers.ElidedDense (the classifier) and '
                     'return its output.')
  if box is not None:
    if labels is None:
      raise ValueError('trace: a box needs the labels (the classifier bounds margins).')
    boxes: dict = {}
    with nn.intercept_methods(_box_recorder(boxes)):
      module(box, labels=labels, **call_kwargs)
    _attach_boxes(graph, boxes)
  return graph, out.value
