"""Tests for cerdeq_jax.per_device: DEQ solves under a device mesh, run in a
subprocess with 4 forced CPU devices."""
import json

import pytest

from tests import helpers_training as h

# Each layout: mesh shape, axis names, axis type, the batch's partition spec,
# whether the jit runs with the mesh in context (``jax.set_mesh``).
LAYOUTS = [((4,), ('d',), 'Auto', ('d',), True),
           ((4,), ('d',), 'Explicit', ('d',), True),
           ((1,), ('d',), 'Explicit', ('d',), True),           # one device, explicit types
           ((2, 2), ('d', 'm'), 'Explicit', ('d',), True),     # batch on one axis of two
           ((2, 2), ('d', 'm'), 'Explicit', (('d', 'm'),), True),
           ((4,), ('d',), 'Auto', ('d',), False),              # a user's jit, no mesh set
           ((4,), ('d',), 'Explicit', ('d',), False)]
IDS = ['auto', 'explicit', 'explicit-one-device', 'explicit-2d-one-axis', 'explicit-2d-both',
       'auto-no-context', 'explicit-no-context']

SCRIPT = r'''
import contextlib, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from cerdeq_jax import interval, layers
from tests.helpers_training import collectives_in_loops

deq = layers.DEQ(6)
x = jnp.asarray(np.random.RandomState(0).rand(8, 6, 6, 3), jnp.float32)
variables = deq.init(jax.random.PRNGKey(0), x)


def outputs(v, x):  # the nominal solve; a loss on it and on the interval solve, its gradient
  def loss(params):
    w = {**v, 'params': params}
    box = deq.apply(w, interval.Interval(x - .02, x + .02))
    return jnp.sum(deq.apply(w, x) ** 2) + jnp.sum(box.upper - box.lower)
  return (deq.apply(v, x),) + jax.value_and_grad(loss)(v['params'])


both = jax.jit(outputs)
lone = [np.asarray(a) for a in jax.tree_util.tree_leaves(both(variables, x))]
out = []
for shape, names, kind, spec, in_context in json.loads(sys.argv[1]):
  mesh = jax.make_mesh(tuple(shape), tuple(names),
                       axis_types=(getattr(AxisType, kind),) * len(shape))
  spec = P(*[tuple(s) if isinstance(s, list) else s for s in spec])
  try:
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
      xs = jax.device_put(x, NamedSharding(mesh, spec))
      y = both(variables, xs)
      loops, found = collectives_in_loops(both.lower(variables, xs).compile().as_text())
  except Exception as e:  # reported by the layout's own test
    out.append(dict(exception=f'{type(e).__name__}: {str(e)[:300]}'))
    continue
  out.append(dict(error=max(float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
                            for a, b in zip(jax.tree_util.tree_leaves(y), lone)),
                  batch_spec=str(y[0].sharding.spec[0]), loops=loops, collectives=found))
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def sharded_runs():
  return h.run_on_devices(SCRIPT, json.dumps(LAYOUTS))


@pytest.mark.parametrize('index', range(len(LAYOUTS)), ids=IDS)
def test_deq_under_a_mesh_equals_one_device(sharded_runs, index):
  """The nominal and interval DEQ solves of a batch sharded over a mesh
  (automatic or explicit axes, one device or several, the batch on some or all
  of them, the mesh in context or only in the batch's sharding), and the
  implicit gradient of a loss on both, equal the unsharded ones (relative
  1e-5); the output keeps the batch's layout, and no solver loop of the
  compiled program (forward or adjoint) holds a collective."""
  run = sharded_runs[index]
  assert 'exception' not in run, run.get('exception')
  assert run['error'] < 1e-5
  expected = LAYOUTS[index][3][0]
  assert run['batch_spec'] == str(tuple(expected) if isinstance(expected, tuple) else expected)
  assert run['loops'] > 0 and run['collectives'] == []
