"""`cerdeq_jax.layers` against independent computations.

Every layer takes an array or an `Interval`. Checked here, with the same
parameters for both paths:

* a zero-width interval reproduces the array output (to 1e-5);
* the interval output encloses the array outputs of points sampled in the
  input box and of points found by a small PGD written here (sign-gradient
  ascent of ``sum(v * f(x))`` for random sign patterns ``v``, which pushes every
  output coordinate towards one of its bounds at once);
* BatchNorm, the DEQ fixed point and the initialisations against hand
  computations written with numpy / plain ``lax``.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cerdeq_jax import deq, layers, parametrize, reparam, solvers
from cerdeq_jax.deq import abs_operator_bound
from cerdeq_jax.interval import Interval


def key(n):
  """A PRNG key of the 'rbg' implementation: initialisers compile several
  times faster on CPU than with the default threefry (same distributions)."""
  return jax.random.key(n, impl='rbg')


HIGHEST = lax.Precision.HIGHEST



# --- helpers (independent of cerdeq_jax) ---

def ref_conv(x, kernel, strides=(1, 1), padding='SAME', groups=1):
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups,
      precision=HIGHEST)


def uniform_in_box(rng, box, n):
  lo, up = np.asarray(box.lower), np.asarray(box.upper)
  u = rng.uniform(size=(n,) + lo.shape).astype(lo.dtype)
  pts = lo + u * (up - lo)
  # Two corners too: extreme points are where loose rules break first.
  signs = rng.integers(0, 2, size=(2,) + lo.shape).astype(bool)
  corners = np.where(signs, up, lo)
  return jnp.asarray(np.concatenate([pts, corners]))


def pgd_ascent(f, box, vs, x0s, steps=15):
  """Sign-gradient ascent of ``sum(v * f(x))`` in the box from each ``x0`` (one
  point per random sign pattern ``v`` over the output): pushes every output
  coordinate towards one of its bounds at once. Traceable (lax loop)."""
  width = box.upper - box.lower

  def attack(v, x0):
    grad = jax.grad(lambda x: jnp.sum(v * f(x)))

    def body(i, x):
      frac = 0.2 * (1.0 - 0.9 * i / steps)
      return jnp.clip(x + frac * width * jnp.sign(grad(x)), box.lower, box.upper)
    return lax.fori_loop(0, steps, body, x0)

  return jax.vmap(attack)(vs, x0s)


def _cat(*arrays):
  return jnp.concatenate(arrays)


def probe(f, x, box, seed=0, n_samples=16, n_dirs=2, extra=None):
  """One compiled call: ``f(x)``, ``f([x, x])``, ``f(box)``, f at sampled and
  PGD points of the box, and ``extra(x, box)``. Returns numpy values.

  ``f`` must act sample by sample: the points are evaluated as one batch and
  the zero-width and wide boxes as one interval batch (fewer copies of the
  computation to compile).
  """
  rng = np.random.default_rng(seed)
  samples = uniform_in_box(rng, box, n_samples)
  out_shape = jax.eval_shape(f, x).shape
  vs = jnp.asarray(np.where(rng.integers(0, 2, (n_dirs,) + out_shape), 1.0, -1.0), jnp.float32)
  x0s = uniform_in_box(rng, box, n_dirs)[:n_dirs]

  @jax.jit
  def run(x, box, samples, vs, x0s):
    n = x.shape[0]
    attacked = pgd_ascent(f, box, vs, x0s)
    points = _cat(x[None], samples, attacked)  # (P, N, ...)
    values = f(points.reshape((-1,) + x.shape[1:]))
    values = values.reshape(points.shape[:1] + (n,) + values.shape[1:])
    both = f(Interval(_cat(x, box.lower), _cat(x, box.upper)))
    res = dict(y=values[0], values=values[1:], attacked=attacked,
               point=Interval(both.lower[:n], both.upper[:n]),
               out=Interval(both.lower[n:], both.upper[n:]))
    if extra is not None:
      res['extra'] = extra(x, box)
    return res

  res = run(x, box, samples, vs, x0s)
  return jax.tree_util.tree_map(np.asarray, res)


def assert_encloses(out: Interval, values, atol=1e-5, rtol=1e-5):
  """Every ``values[s]`` lies in ``out`` (up to rounding)."""
  lo, up, vals = np.asarray(out.lower), np.asarray(out.upper), np.asarray(values)
  assert np.all(np.isfinite(lo)) and np.all(np.isfinite(up))
  tol = atol + rtol * np.abs(vals)
  assert np.all(vals >= lo - tol), f'below lower bound by {np.max(lo - vals)}'
  assert np.all(vals <= up + tol), f'above upper bound by {np.max(vals - up)}'


def check_enclosure(f, x, box, atol=1e-5, **kw):
  """The interval output of ``f`` on the box encloses f at sampled and
  attacked points (the attacked points stay in the box)."""
  res = probe(f, x, box, **kw)
  assert np.all(res['attacked'] >= np.asarray(box.lower))
  assert np.all(res['attacked'] <= np.asarray(box.upper))
  assert_encloses(res['out'], res['values'], atol)
  return res


def normal(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --- every layer: zero width and enclosure ---

def _bn_eval_vars(variables):
  """Non-trivial BatchNorm parameters: a negative scale and running stats."""
  c = variables['params']['scale'].shape[0]
  return {'params': {'scale': jnp.linspace(-1.5, 2.0, c), 'bias': jnp.linspace(-0.3, 0.4, c)},
          'batch_stats': {'mean': jnp.linspace(0.2, -0.5, c), 'var': jnp.linspace(0.5, 2.0, c)}}


LAYERS = {
    'dense': (lambda: layers.Dense(3), (2, 5), None),
    'conv': (lambda: layers.Conv(4, (3, 3)), (2, 5, 5, 2), None),
    'conv_s2_valid_groups': (
        lambda: layers.Conv(4, (3, 3), strides=(2, 2), padding='VALID', feature_group_count=2),
        (2, 7, 7, 4), None),
    'batchnorm_eval': (lambda: layers.BatchNorm(use_running_average=True), (2, 3, 3, 4),
                       _bn_eval_vars),
    'relu': (lambda: layers.ReLU(), (2, 3, 3, 2), None),
    'tanh': (lambda: layers.Activation(jnp.tanh), (2, 6), None),
    'flatten': (lambda: layers.Flatten(), (2, 3, 3, 2), None),
    'avgpool': (lambda: layers.AvgPool((2, 2)), (2, 4, 4, 2), None),
    'maxpool': (lambda: layers.MaxPool((3, 3), (2, 2), 'SAME'), (2, 5, 5, 2), None),
}


@pytest.mark.parametrize('name', list(LAYERS))
def test_zero_width_interval_matches_array_and_box_encloses(name):
  make, shape, tweak = LAYERS[name]
  module = make()
  x = normal(0, shape)
  variables = module.init(key(1), x)
  if tweak is not None:
    variables = tweak(variables)
  f = lambda z: module.apply(variables, z)
  box = Interval(x - 0.1, x + 0.1)
  res = check_enclosure(f, x, box)
  y, point, out = res['y'], res['point'], res['out']
  assert isinstance(point, Interval) and not isinstance(y, Interval)
  np.testing.assert_allclose(point.lower, y, atol=1e-5, rtol=0)
  np.testing.assert_allclose(point.upper, y, atol=1e-5, rtol=0)
  assert out.lower.shape == y.shape
  # Bounds are not vacuous: the box has positive width downstream.
  assert np.max(out.upper - out.lower) > 1e-3


def test_dense_and_conv_array_paths_match_lax():
  x = normal(0, (2, 5))
  d = layers.Dense(3)
  v = d.init(key(1), x)
  p = v['params']
  np.testing.assert_allclose(d.apply(v, x), np.asarray(x) @ np.asarray(p['kernel']) + p['bias'],
                             rtol=1e-5, atol=1e-6)
  x = normal(2, (2, 7, 7, 4))
  c = layers.Conv(6, (3, 3), strides=(2, 2), padding='VALID', feature_group_count=2)
  v = c.init(key(3), x)
  p = v['params']
  assert p['kernel'].shape == (3, 3, 2, 6)
  p = {'kernel': p['kernel'], 'bias': jnp.arange(6.0)}
  y = c.apply({'params': p}, x)
  assert y.shape == (2, 3, 3, 6)
  np.testing.assert_allclose(y, ref_conv(x, p['kernel'], (2, 2), 'VALID', 2) + p['bias'],
                             rtol=1e-5, atol=1e-5)
  # Interval in W+/W- form (the paper's), independent of the centre/radius rule.
  box = Interval(x - 0.2, x + 0.3)
  out = c.apply({'params': p}, box)
  kp, kn = jnp.maximum(p['kernel'], 0), jnp.minimum(p['kernel'], 0)
  conv = lambda z, k: ref_conv(z, k, (2, 2), 'VALID', 2)
  np.testing.assert_allclose(out.upper, conv(box.upper, kp) + conv(box.lower, kn) + p['bias'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.lower, conv(box.lower, kp) + conv(box.upper, kn) + p['bias'],
                             rtol=1e-5, atol=1e-5)


def test_conv_rejects_indivisible_groups():
  with pytest.raises(ValueError):
    layers.Conv(4, feature_group_count=2).init(key(0), jnp.ones((1, 4, 4, 3)))


def test_add_intervals_and_mixing_raises():
  a, b = normal(0, (2, 3)), normal(1, (2, 3))
  ia, ib = Interval(a - 0.1, a + 0.2), Interval(b - 0.3, b + 0.05)
  s = layers.add(ia, ib)
  np.testing.assert_allclose(layers.add(a, b), np.asarray(a) + np.asarray(b))
  np.testing.assert_allclose(s.lower, a + b - 0.4, atol=1e-6)
  np.testing.assert_allclose(s.upper, a + b + 0.25, atol=1e-6)
  p = layers.add(Interval(a, a), Interval(b, b))
  np.testing.assert_allclose(p.lower, a + b, atol=1e-6)
  with pytest.raises(ValueError):
    layers.add(ia, b)


def test_elided_dense_margins():
  x = normal(0, (3, 6))
  labels = jnp.array([0, 2, 1])
  m = layers.ElidedDense(4)
  v = m.init(key(1), x)
  v = {'params': {'kernel': v['params']['kernel'], 'bias': jnp.array([0.1, -0.2, 0.3, 0.0])}}
  logits = m.apply(v, x)
  assert logits.shape == (3, 4)
  exact = lambda lg: jnp.take_along_axis(lg, labels[:, None], 1) - lg
  point = m.apply(v, Interval(x, x), labels)
  np.testing.assert_allclose(point, exact(logits), atol=1e-5)
  box = Interval(x - 0.2, x + 0.2)
  margins = m.apply(v, box, labels)
  assert np.all(np.asarray(margins)[np.arange(3), labels] == 0)
  # Lower bounds of the margins: the margins of points never go below them.
  rng = np.random.default_rng(0)
  pts = uniform_in_box(rng, box, 64)
  sampled = jax.vmap(lambda z: exact(m.apply(v, z)))(pts)
  assert np.all(np.asarray(sampled) >= np.asarray(margins)[None] - 1e-5)
  # The elided bound is attained at the corner sign(W_j - W_y): it is exact
  # for one affine layer (tighter than subtracting logit bounds).
  w = np.asarray(v['params']['kernel'])
  for n, y in enumerate(np.asarray(labels)):
    for j in range(4):
      corner = np.where(w[:, j] - w[:, y] > 0, box.upper[n], box.lower[n])
      lg = corner @ w + np.asarray(v['params']['bias'])
      np.testing.assert_allclose(margins[n, j], lg[y] - lg[j], atol=1e-5)
  with pytest.raises(ValueError):
    m.apply(v, box)


# --- BatchNorm ---

def _bn_hand(lower, upper, mean, var, scale, bias, eps=1e-5):
  f = lambda z: (z - mean) / np.sqrt(var + eps) * scale + bias
  a, b = f(lower), f(upper)
  return np.minimum(a, b), np.maximum(a, b)


def test_batchnorm_train_interval_uses_clean_batch_moments():
  x = normal(0, (4, 3, 3, 3), 2.0) + 1.0
  bn = layers.BatchNorm(use_running_average=False)
  variables = bn.init(key(0), x)
  scale = jnp.array([1.5, -0.7, 0.3])
  bias = jnp.array([0.1, 0.2, -0.3])
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': {'mean': jnp.array([9., 9., 9.]), 'var': jnp.array([5., 5., 5.])}}
  box = Interval(x - 0.3, x + 0.1)

  def both(module, x, box):
    return module(x), module(box)
  (y, out), cols = bn.apply(variables, x, box, method=both,
                            mutable=['batch_stats', layers.BATCH_MOMENTS])
  xn = np.asarray(x, np.float64)
  mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
  sc, bi = np.asarray(scale, np.float64), np.asarray(bias, np.float64)
  np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var + 1e-5) * sc + bi, atol=1e-5)
  lo, up = _bn_hand(np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64),
                    mean, var, sc, bi)
  np.testing.assert_allclose(out.lower, lo, atol=1e-5)
  np.testing.assert_allclose(out.upper, up, atol=1e-5)
  np.testing.assert_allclose(cols[layers.BATCH_MOMENTS]['mean'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cols[layers.BATCH_MOMENTS]['var'], var, rtol=1e-5)
  # The interval call did not use the running averages (9, 5): with them the
  # result would be far away.
  lo_ra, _ = _bn_hand(np.asarray(box.lower), np.asarray(box.upper), 9.0, 5.0, sc, bi)
  assert np.max(np.abs(lo_ra - np.asarray(out.lower))) > 0.1


def test_batchnorm_train_interval_without_clean_pass_raises():
  x = normal(0, (2, 3, 3, 2))
  bn = layers.BatchNorm(use_running_average=False)
  # Straight from init: the init call (in training mode) must not leave
  # moments behind that would stand in for the clean batch's.
  variables = bn.init(key(0), x)
  assert layers.BATCH_MOMENTS not in variables
  with pytest.raises(ValueError):
    bn.apply(variables, Interval(x, x + 0.1), mutable=['batch_stats', layers.BATCH_MOMENTS])
  with pytest.raises(ValueError):
    bn.apply(variables, Interval(x, x + 0.1), mutable=['batch_stats'])


def test_batchnorm_eval_uses_running_averages():
  x = normal(0, (3, 2, 2, 4), 3.0)
  bn = layers.BatchNorm(use_running_average=True)
  variables = _bn_eval_vars(bn.init(key(0), x))
  box = Interval(x - 0.2, x + 0.5)
  p, s = variables['params'], variables['batch_stats']
  args = [np.asarray(a, np.float64) for a in (s['mean'], s['var'], p['scale'], p['bias'])]
  y = bn.apply(variables, x)
  out = bn.apply(variables, box)
  lo, up = _bn_hand(np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64), *args)
  np.testing.assert_allclose(out.lower, lo, atol=1e-5)
  np.testing.assert_allclose(out.upper, up, atol=1e-5)
  y_hand, _ = _bn_hand(np.asarray(x, np.float64), np.asarray(x, np.float64), *args)
  np.testing.assert_allclose(y, y_hand, atol=1e-5)
  # The call-time argument overrides the attribute: in training mode the same
  # input uses its own moments and gives a different output.
  y_train, _ = layers.BatchNorm(use_running_average=None).apply(
      variables, x, use_running_average=False, mutable=['batch_stats'])
  assert np.max(np.abs(np.asarray(y_train) - np.asarray(y))) > 0.1


def test_batchnorm_running_averages_update_with_momentum():
  x = normal(0, (5, 2, 2, 3), 2.0) + 0.5
  bn = layers.BatchNorm(use_running_average=False, momentum=0.8)
  variables = bn.init(key(0), x)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], np.zeros(3))
  np.testing.assert_array_equal(variables['batch_stats']['var'], np.ones(3))
  old_mean, old_var = np.array([0.3, -0.1, 2.0]), np.array([1.5, 0.2, 4.0])
  variables = {'params': variables['params'],
               'batch_stats': {'mean': jnp.asarray(old_mean, jnp.float32),
                               'var': jnp.asarray(old_var, jnp.float32)}}
  _, cols = bn.apply(variables, x, mutable=['batch_stats'])
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(cols['batch_stats']['mean'],
                             0.8 * old_mean + 0.2 * xn.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cols['batch_stats']['var'],
                             0.8 * old_var + 0.2 * xn.var((0, 1, 2)), rtol=1e-5)
  # Eval mode leaves them alone.
  _, cols = layers.BatchNorm(use_running_average=True).apply(
      variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(cols['batch_stats']['mean'], old_mean, rtol=1e-6)


def test_relu_sows_preactivations_for_intervals_only():
  x = normal(0, (2, 4))
  act = layers.ReLU()
  box = Interval(x - 0.1, x + 0.1)
  _, cols = act.apply({}, box, mutable=['preactivations'])
  (sown,) = cols['preactivations']['bounds']
  np.testing.assert_array_equal(sown.lower, box.lower)
  _, cols = act.apply({}, x, mutable=['preactivations'])
  assert 'preactivations' not in cols or not cols['preactivations']


# --- DEQ ---
# Compiling is most of the cost on CPU: small computations run eagerly (the
# per-operation compilations are shared between tests), DEQ solves with their
# attacks in one `jit` per test, with the Picard solver (several times cheaper
# to compile than Anderson; the model tests use Anderson).

def _stats_shapes_ok(stats, n):
  for field in stats:
    assert field.shape == (n,), stats


def test_deq_fixed_point_stats_and_enclosure():
  # Scale 0.5: the sound widening L/(1-L) * residual stays below 1e-5, so a
  # zero-width box reproduces the array output to 1e-5.
  module = layers.DEQ(4, parametrization=parametrize.Parametrization('bjorck', 0.5),
                      solver=solvers.Picard(tol=1e-6, max_iter=100))
  n = 2
  x = normal(5, (n, 5, 5, 3))
  # Only the parameters: `init` also returns what it sowed ('deq_stats').
  variables = {'params': module.init(key(2), x)['params']}
  box = Interval(x - 0.05, x + 0.05)
  rng = np.random.default_rng(0)
  samples = uniform_in_box(rng, box, 10)
  vs = jnp.asarray(np.where(rng.integers(0, 2, (2, n, 5, 5, 4)), 1.0, -1.0), jnp.float32)

  @jax.jit
  def run(x, box, samples, vs):
    # strict=True: every sample here is certifiable, so nothing changes.
    f = lambda z: module.apply(variables, z, strict=True)
    attacked = pgd_ascent(f, box, vs, samples[:2])
    points = _cat(x[None], samples, attacked)
    z, nominal = module.apply(variables, points.reshape((-1,) + x.shape[1:]),
                              mutable=['deq_stats'])
    both, interval = module.apply(
        variables, Interval(_cat(x, box.lower), _cat(x, box.upper)), strict=True,
        mutable=['deq_stats', 'preactivations'])
    return z.reshape(points.shape[:2] + z.shape[1:]), nominal, both, interval, attacked
  zs, nominal, both, interval, attacked = jax.tree_util.tree_map(
      np.asarray, run(x, box, samples, vs))
  z = zs[0]
  point = Interval(both.lower[:n], both.upper[:n])
  out = Interval(both.lower[n:], both.upper[n:])

  # The array output satisfies z = relu(conv(z, W) + conv(x, U) + b).
  p = variables['params']
  w, u, b = p['hidden_kernel'], p['injection']['kernel'], p['injection']['bias']
  assert w.shape == (3, 3, 4, 4) and u.shape == (3, 3, 3, 4)
  fz = jax.nn.relu(ref_conv(z, w) + ref_conv(x, u) + b)
  np.testing.assert_allclose(z, fz, atol=1e-5)
  assert np.max(np.abs(z)) > 1e-2  # not the trivial zero fixed point
  # Unrolled Picard from zero (contraction 0.5) converges to the same point.
  zr = jnp.zeros_like(z)
  for _ in range(60):
    zr = jax.nn.relu(ref_conv(zr, w) + ref_conv(x, u) + b)
  np.testing.assert_allclose(z, zr, atol=1e-5)

  # Per-sample statistics.
  (stats,) = nominal['deq_stats']['nominal']
  _stats_shapes_ok(stats, zs.shape[0] * n)
  assert np.all(stats.converged)
  assert not np.any(stats.certifiable)  # arrays are never "certified"
  (stats,) = interval['deq_stats']['interval']
  _stats_shapes_ok(stats, 2 * n)
  assert np.all(stats.certifiable)
  assert np.all(stats.lipschitz < 0.5 + 1e-6)
  (pre,) = interval['preactivations']['bounds']
  assert pre.lower.shape == (2 * n, 5, 5, 4)
  # The output bounds are the ReLU of the sown pre-activation bounds, widened.
  assert np.all(both.upper >= jax.nn.relu(pre.upper) - 1e-6)
  assert np.all(both.lower <= jax.nn.relu(pre.lower) + 1e-6)

  # Zero width: the (soundly widened) interval fixed point is the array one.
  np.testing.assert_allclose(point.lower, z, atol=1e-5, rtol=0)
  np.testing.assert_allclose(point.upper, z, atol=1e-5, rtol=0)
  # Enclosure of the sampled and attacked fixed points.
  assert np.all(attacked >= np.asarray(box.lower)) and np.all(attacked <= np.asarray(box.upper))
  assert_encloses(out, zs[1:], atol=2e-5)
  assert np.max(out.upper - out.lower) > 1e-3


def test_deq_interval_solve_starts_at_the_clean_fixed_point():
  """With `layers.DEQ_START` mutable, an interval call after an array call in
  the same ``apply`` starts at ``[z*, z*]``: at zero width that is the fixed
  point (no iteration); at positive width the same bounds as from zeros, in
  fewer iterations; a box of another batch shape starts from zeros."""
  module = layers.DEQ(4, parametrization=parametrize.Parametrization('bjorck', 0.9),
                      solver=solvers.Anderson(tol=1e-6, max_iter=200))
  x = normal(7, (3, 6, 6, 3))
  variables = {'params': module.init(key(4), x)['params']}
  collections = ['deq_stats', layers.DEQ_START]

  def interval_after_clean(clean, box):
    both = lambda m, a, b: (m(a), m(b))
    (z, bounds), cols = module.apply(variables, clean, box, method=both, mutable=collections)
    return z, bounds, cols['deq_stats']['interval'][0].iterations

  def interval_alone(box):
    bounds, cols = module.apply(variables, box, mutable=['deq_stats'])
    return bounds, cols['deq_stats']['interval'][0].iterations

  z, point, iterations = jax.jit(interval_after_clean)(x, Interval(x, x))
  assert np.all(np.asarray(iterations) == 0)
  np.testing.assert_allclose(point.lower, z, atol=1e-5, rtol=0)
  np.testing.assert_allclose(point.upper, z, atol=1e-5, rtol=0)

  box = Interval(x - 0.03, x + 0.03)
  _, warm, warm_iterations = jax.jit(interval_after_clean)(x, box)
  cold, cold_iterations = jax.jit(interval_alone)(box)
  warm_iterations, cold_iterations = np.asarray(warm_iterations), np.asarray(cold_iterations)
  assert np.all(warm_iterations <= cold_iterations)
  assert np.sum(warm_iterations) < np.sum(cold_iterations)
  np.testing.assert_allclose(warm.lower, cold.lower, atol=1e-5, rtol=0)
  np.testing.assert_allclose(warm.upper, cold.upper, atol=1e-5, rtol=0)
  samples = uniform_in_box(np.random.default_rng(1), box, 8)
  outputs = jax.jit(jax.vmap(lambda s: module.apply(variables, s)))(samples)
  assert_encloses(warm, np.asarray(outputs), atol=2e-5)

  # Another batch shape: the kept z* does not fit, the solve starts at zeros.
  _, _, other = jax.jit(interval_after_clean)(x, Interval(x[:2] - 0.03, x[:2] + 0.03))
  np.testing.assert_array_equal(other, np.asarray(cold_iterations)[:2])


def test_deq_strict_gives_infinite_bounds_when_not_certifiable():
  # The shapes of the test above: eager operations compiled there are reused.
  x = normal(0, (2, 5, 5, 3))
  loose = layers.DEQ(4, solver=solvers.Picard(tol=1e-12, max_iter=1))
  variables = {'params': loose.init(key(0), x)['params']}
  box = Interval(x - 0.1, x + 0.1)

  def run(box):
    strict, cols = loose.apply(variables, box, strict=True, mutable=['deq_stats'])
    return strict, cols['deq_stats']['interval'][0], loose.apply(variables, box, strict=False)
  strict, stats, relaxed = run(box)
  assert not np.any(np.asarray(stats.converged))
  assert not np.any(np.asarray(stats.certifiable))
  assert np.all(np.asarray(stats.lipschitz) < 1)
  assert np.all(np.asarray(strict.lower) == -np.inf) and np.all(np.asarray(strict.upper) == np.inf)
  # Not strict (training losses): the computed interval iterate as is, finite.
  assert np.all(np.isfinite(np.asarray(relaxed.lower)))
  assert np.all(np.isfinite(np.asarray(relaxed.upper)))


def _s_norm(kernel):
  k = np.asarray(kernel, np.float64)
  return np.linalg.norm(np.abs(k).sum(axis=(0, 1)), 2)


def _cerdeq_sigma(n_u):
  return math.sqrt(math.pi) / (math.sqrt(2) * n_u)


@pytest.mark.parametrize('method', ['bjorck', 'wn', 'sn'])
def test_deq_initial_hidden_kernel_is_contractive(method):
  scale = 0.9
  module = layers.DEQ(8, parametrization=parametrize.Parametrization(method, scale),
                      solver=solvers.Picard(tol=1e-3, max_iter=1))
  variables = module.init(key(0), jnp.ones((1, 1, 1, 6)))
  kernel = variables['params'][layers.HIDDEN_KERNEL]
  assert kernel.shape == (3, 3, 8, 8)
  bound = _s_norm(kernel)
  assert bound <= scale
  assert float(abs_operator_bound(kernel)) <= scale
  if method == 'bjorck':
    # Orthogonalised, then scaled so that the bound *is* the scale.
    np.testing.assert_allclose(bound, scale, rtol=1e-3)
    q = np.asarray(kernel, np.float64).reshape(-1, 8)
    gram = q.T @ q
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(8), atol=1e-3)
  if method == 'sn':
    assert layers.SPECTRAL in variables
    sigma = np.linalg.norm(np.asarray(kernel, np.float64).reshape(-1, 8), 2)
    assert sigma <= scale + 1e-4
  # The injection has the CerDEQ initialisation (3x3, 6 -> 8: 432 weights, so
  # a loose tolerance; the formula itself is checked on a large layer below).
  u = np.asarray(variables['params']['injection']['kernel'], np.float64)
  assert u.shape == (3, 3, 6, 8)
  np.testing.assert_allclose(u.std(), _cerdeq_sigma(54), rtol=0.15)
  np.testing.assert_array_equal(variables['params']['injection']['bias'], 0)


def test_deq_initial_injection_std_matches_cerdeq_formula():
  # A large layer (3x3, 16 -> 64: 9216 weights) through the DEQ's own default
  # initialiser (building the layer itself would run a solve for nothing).
  c_in, features = 16, 64
  init = layers.DEQ(features).injection_init
  u = np.asarray(init(key(0), (3, 3, c_in, features)), np.float64)
  n_u = 3 * 3 * c_in
  sigma = _cerdeq_sigma(n_u)
  np.testing.assert_allclose(u.std(), sigma, rtol=0.03)
  assert abs(u.mean()) < 0.05 * sigma
  # n_u * E|U| = 1 (the property the formula is chosen for).
  np.testing.assert_allclose(n_u * np.abs(u).mean(), 1.0, rtol=0.03)


# --- DEQ: method names, 'reparam' mode, the rho bound ---

def test_deq_accepts_method_names():
  x = jnp.ones((1, 1, 1, 6))
  for method in parametrize.METHODS:
    module = layers.DEQ(8, parametrization=method, solver=solvers.Picard(tol=1e-3, max_iter=1))
    shapes = jax.eval_shape(lambda: module.init(key(0), x))
    assert shapes['params'][layers.HIDDEN_KERNEL].shape == (3, 3, 8, 8)
    assert (layers.SPECTRAL in shapes) == (method == 'sn')
  with pytest.raises(ValueError, match='orthogonal'):
    jax.eval_shape(lambda: layers.DEQ(8, parametrization='orthogonal').init(key(0), x))


def _rho_beyond_two_norm_kernel(c, rng):
  """A free V (3, 3, c, c) whose S is non-normal: ||S||_2 > 2 rho(S)."""
  s = rng.uniform(0.05, 0.2, (c, c)) + np.diag(rng.uniform(0.2, 0.4, c))
  s[0, 1:] += 2.0
  w = rng.uniform(0.2, 1.0, (3, 3, c, c))
  w = w / w.sum(axis=(0, 1)) * s.T
  return jnp.asarray(np.where(rng.uniform(size=w.shape) < 0.5, -w, w), jnp.float32)


@pytest.mark.parametrize('method, bound', [('bjorck', 'spectral'), ('sn', 'rho'),
                                           ('wn', 'rho-beyond-2-norm')])
def test_deq_reparam_bounds_are_sound(method, bound):
  """'reparam' mode: the forward's W(V) keeps its bound, and the strict
  interval output encloses the outputs at sampled and PGD points. The last
  case sets V by hand so that W = s V / rho(V) has ||S||_2 > 1: the
  certificate rests on rho alone."""
  scale = 0.9
  p = parametrize.Parametrization(method, scale, mode='reparam', bound=bound.split('-')[0])
  module = layers.DEQ(4, parametrization=p, solver=solvers.Picard(tol=1e-6, max_iter=200))
  x = normal(5, (2, 5, 5, 3))
  variables = module.init(key(3), x)
  variables = {k: v for k, v in variables.items() if k in ('params', layers.SPECTRAL)}
  assert layers.HIDDEN_KERNEL not in variables['params']
  if bound == 'rho-beyond-2-norm':
    free = _rho_beyond_two_norm_kernel(4, np.random.default_rng(1))
    variables['params'] = dict(variables['params'], **{layers.HIDDEN_FREE: free})
  w = reparam.hidden_kernel(variables['params'], variables.get(layers.SPECTRAL), p)
  rho = float(deq.channel_contraction(w)[1])
  assert float(parametrize.contraction_bound(w, p.bound)) <= scale
  if bound == 'rho-beyond-2-norm':
    assert float(abs_operator_bound(w)) > 1.5 and rho <= scale

  def stats(x, box):
    _, cols = module.apply(variables, box, mutable=['deq_stats'])
    return cols['deq_stats']['interval'][0]
  box = Interval(x - 0.05, x + 0.05)
  res = check_enclosure(lambda z: module.apply(variables, z), x, box, atol=2e-5, extra=stats)
  st = res['extra']
  assert np.all(st.certifiable) and np.all(st.lipschitz <= scale)
  np.testing.assert_allclose(st.lipschitz, min(rho, float(abs_operator_bound(w))), rtol=1e-6)
  # The forward used W: the array output is its fixed point.
  p_ = variables['params']
  fz = jax.nn.relu(ref_conv(res['y'], w) + ref_conv(x, p_['injection']['kernel'])
                   + p_['injection']['bias'])
  np.testing.assert_allclose(res['y'], fz, atol=1e-5)
  assert np.max(res['out'].upper - res['out'].lower) > 1e-3


@pytest.mark.parametrize('method, bound', [('bjorck', 'spectral'), ('sn', 'rho')])
def test_deq_reparam_gradient_matches_finite_differences(x64, method, bound):
  """Gradients w.r.t. V flow through W(V) (Björck / power-iteration estimate,
  and the bound) and the DEQ's implicit gradients, nominal and interval."""
  p = parametrize.Parametrization(method, 0.8, iters=30, mode='reparam', bound=bound)
  module = layers.DEQ(3, parametrization=p, solver=solvers.Picard(tol=1e-13, max_iter=400))
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 2)))
  variables = module.init(key(4), x.astype(jnp.float32))  # float32 injection init
  variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), {
      k: v for k, v in variables.items() if k in ('params', layers.SPECTRAL)})
  free = variables['params'][layers.HIDDEN_FREE]
  c = [jnp.asarray(rng.normal(size=(2, 4, 4, 3))) for _ in range(3)]
  box = Interval(x - 0.1, x + 0.1)

  @jax.jit
  def loss(free):
    v = dict(variables, params=dict(variables['params'], **{layers.HIDDEN_FREE: free}))
    z = module.apply(v, x)
    zb = module.apply(v, box, strict=False)
    return jnp.sum(c[0] * z) + jnp.sum(c[1] * zb.upper) + jnp.sum(c[2] * zb.lower)

  grad = np.asarray(jax.grad(loss)(free))
  assert np.abs(grad).max() > 1e-3
  d = rng.normal(size=free.shape)
  h = 1e-6
  fd = (float(loss(free + h * d)) - float(loss(free - h * d))) / (2 * h)
  # rho: the power iteration's 1e-6 shift makes v the Perron vector only to ~1e-6.
  np.testing.assert_allclose(np.vdot(grad, d), fd, rtol=1e-6 if bound == 'spectral' else 1e-4)
