"""The precision policy (`cerdeq_jax.precision`), read off lowered programs.

No accelerator is needed: the precision of every ``dot_general`` and
``convolution`` is in the StableHLO text of ``jax.jit(f).lower(...)``, and the
op's name stack (``as_text(debug_info=True)``) tells which layer or solve it
belongs to. What a TPU or a TF32 GPU would run at reduced precision is exactly
what is not ``HIGHEST`` there.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_training as h
from cerdeq_jax import data, deq, ops, precision, solvers, training
from cerdeq_jax.interval import Interval

_OP = re.compile(r'stablehlo\.(dot_general|convolution)\b')


def lowered_ops(fn, *args) -> list[dict]:
  """Every dot_general / convolution of ``jax.jit(fn).lower(*args)``: its
  ``precision`` (HIGHEST, DEFAULT or none), whether its result is float32, and
  its name stack (the Flax module path, ``while`` for solver loops)."""
  text = jax.jit(fn).lower(*args).as_text(debug_info=True)
  locs = dict(re.findall(r'^(#loc\d+) = (loc\(.*\))$', text, re.M))
  out = []
  for line in text.splitlines():
    if not _OP.search(line):
      continue
    ref = re.search(r'loc\((#loc\d+)\)\s*$', line)
    name = re.match(r'loc\("([^"]*)"', locs.get(ref.group(1), '')) if ref else None
    level = re.search(r'\b(HIGHEST|HIGH|DEFAULT)\b', line)
    out.append({'precision': level.group(1) if level else 'none',
                'f32': bool(re.search(r'->\s*tensor<[^>]*xf32>', line)),
                'name': name.group(1) if name else ''})
  assert out, 'no dot_general/convolution lowered'
  return out


def assert_all_highest(ops_: list[dict]):
  assert all(o['f32'] for o in ops_), [o for o in ops_ if not o['f32']][:3]
  low = [o['name'] for o in ops_ if o['precision'] != 'HIGHEST']
  assert not low, f'{len(low)} of {len(ops_)} ops below HIGHEST: {sorted(set(low))[:8]}'


@pytest.fixture(scope='module')
def tiny():
  model = h.tiny_model('cerdeq')
  tx = h.optimizer(1e-2)
  cfg = h.certified_training(model, 0.1)
  assert cfg.precision == 'default'  # the documented default of training passes
  state = training.init_state(model, tx, jax.random.PRNGKey(0),
                              jnp.zeros((1, h.IMAGE_SIZE, h.IMAGE_SIZE, 1)), cfg.parametrization)
  ds = h.quadrant_dataset(h.BATCH, seed=1)
  batch = next(data.epoch_batches(ds, h.BATCH, 0, 0))
  return model, tx, cfg, state, batch


# --- the policy itself ---------------------------------------------------------------

def test_layer_precision_is_highest_unless_a_scope_lowers_it():
  x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
  # A new function each time: jit's trace cache does not see the scope (the
  # library enters it inside the functions it jits).
  level = lambda f: lowered_ops(lambda a, b: f(a, b), x, k)[0]['precision']
  assert level(ops.conv) == 'HIGHEST' and level(ops.same_conv) == 'HIGHEST'
  with precision.layers('default'):
    assert level(ops.conv) == 'DEFAULT' and level(ops.same_conv) == 'DEFAULT'
    assert level(lambda a, b: ops.dense(a, b[0, 0])) == 'DEFAULT'
    # An explicit precision wins over the scope; so does a nested scope.
    assert level(lambda a, b: ops.conv(a, b, precision=precision.CERTIFY)) == 'HIGHEST'
    with precision.layers(precision.HIGHEST):
      assert level(ops.conv) == 'HIGHEST'
    assert precision.layer() == precision.DEFAULT
  assert precision.layer() == precision.HIGHEST
  # The input-VJP and kernel-VJP of same_conv follow the forward's precision.
  vjp = lambda p: lambda a, b: jax.vjp(lambda u, v: ops.same_conv(u, v, p), a, b)[1](a)
  assert {o['precision'] for o in lowered_ops(vjp(precision.DEFAULT), x, k)} == {'DEFAULT'}
  assert {o['precision'] for o in lowered_ops(vjp(precision.HIGHEST), x, k)} == {'HIGHEST'}


def test_bad_precision_names_are_refused():
  with pytest.raises(ValueError, match='bf16'):
    precision.parse('bf16')
  with pytest.raises(ValueError, match='precision'):
    training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=1,
                               precision='fast')


def test_cpu_results_do_not_depend_on_the_layer_precision(rng):
  x = jnp.asarray(rng.normal(size=(4, 9, 9, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)
  f = lambda p: jax.jit(lambda a, b: ops.conv(a, b, precision=p))(x, k)
  np.testing.assert_array_equal(f(precision.DEFAULT), f(precision.HIGHEST))


# --- certificates and convergence: HIGHEST whatever the training setting --------------

def test_certified_eval_step_is_all_highest(tiny):
  model, _, cfg, state, batch = tiny
  batch = dict(batch, mask=np.ones(h.BATCH, bool))
  step = functools.partial(training.eval_step, model=model, cfg=cfg, eps=0.1, pgd_steps=2)
  assert_all_highest(lowered_ops(step, state, batch, jax.random.PRNGKey(0)))
  # Even when traced inside a low-precision scope (eval_step enters its own).
  with precision.layers('default'):
    assert_all_highest(lowered_ops(step, state, batch, jax.random.PRNGKey(0)))
  # With the CROWN verifier (back-substitution through the layers' VJPs) too.
  crown_step = functools.partial(step, verifier='crown', crown_max_neurons=64)
  assert_all_highest(lowered_ops(crown_step, state, batch, jax.random.PRNGKey(0)))


@pytest.mark.parametrize('box', [False, True], ids=['nominal', 'interval'])
def test_deq_solve_and_its_gradient_are_all_highest(rng, box):
  """Forward (Anderson), widening and implicit backward (adjoint Anderson
  solve), traced in a scope that asks the layers for DEFAULT."""
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) * 0.05, jnp.float32)
  inj = jnp.asarray(rng.normal(size=(2, 5, 5, 4)), jnp.float32)
  solver = solvers.Anderson(tol=1e-4, max_iter=20)

  def loss(kernel, inj):
    injection = Interval(inj - 0.1, inj + 0.1) if box else inj
    z, stats = deq.solve_deq(kernel, injection, solver, sound=True)
    total = jnp.sum(z.upper - z.lower) if box else jnp.sum(z)
    return total + jnp.sum(stats.lipschitz)

  with precision.layers('default'):
    found = lowered_ops(jax.value_and_grad(loss, argnums=(0, 1)), kernel, inj)
  assert_all_highest(found)
  assert any('while' in o['name'] for o in found)  # the solver loops are in there


# --- training passes: DEFAULT in the layers only -------------------------------------

_LAYER = re.compile(r'/(Conv_\d+|Dense_\d+|injection|classifier)/(conv_general_dilated|dot_general'
                    rf'|{ops.KERNEL_TAPS}/dot_general)$')


@pytest.mark.parametrize('kind', [training.StepKind(True, True), training.StepKind(False, False)],
                         ids=['certified_regularised', 'natural'])
def test_train_step_lowers_default_in_the_layers_only(tiny, kind):
  model, tx, cfg, state, batch = tiny
  step = functools.partial(training.train_step, model=model, tx=tx, cfg=cfg, kind=kind)
  found = lowered_ops(step, state, batch)
  assert all(o['f32'] for o in found)
  low = [o for o in found if o['precision'] != 'HIGHEST']
  assert low and all(o['precision'] == 'DEFAULT' for o in low)
  # Solver loops, the DEQ cell (under vmap), margins and the projection (no
  # module path) stay HIGHEST; the explicit layers, forward and VJP, go DEFAULT.
  # `same_conv`'s kernel-VJP taps run in a scan whose body has no module path:
  # they are recognised by their name scope (they follow the forward's
  # precision, tested above).
  kernel_vjp = f'{ops.KERNEL_TAPS}/dot_general'
  for o in found:
    critical = ('while' in o['name'] or '/deq/vmap' in o['name'] or 'nd,ndk->nk' in o['name']
                or not o['name'].startswith('jit(')) and o['name'] != kernel_vjp
    if critical:
      assert o['precision'] == 'HIGHEST', o
    elif _LAYER.search(o['name']):
      assert o['precision'] == 'DEFAULT', o
  assert {o['name'] for o in low} <= {o['name'] for o in found if _LAYER.search(o['name'])
                                      or o['name'].endswith('/deq/conv_general_dilated')
                                      or o['name'] == kernel_vjp}
  highest = dict(cfg.__dict__, precision='highest')
  step = functools.partial(training.train_step, model=model, tx=tx, kind=kind,
                           cfg=training.CertifiedTraining(**highest))
  assert_all_highest(lowered_ops(step, state, batch))
