"""`cerdeq_jax.losses` against independent computations (optax, numpy, and the
layers' own outputs)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cerdeq_jax import layers, losses
from cerdeq_jax.interval import Interval


def key(n):
  """A PRNG key of the 'rbg' implementation: initialisers compile several
  times faster on CPU than with the default threefry (same distributions)."""
  return jax.random.key(n, impl='rbg')


def _margins(rng, n, k, labels):
  m = rng.normal(size=(n, k)).astype(np.float32) * 2
  m[np.arange(n), labels] = 0.0
  return jnp.asarray(m)


def test_robust_cross_entropy_is_ce_of_worst_case_logits():
  rng = np.random.default_rng(0)
  labels = jnp.array([0, 3, 1, 2, 3])
  margins = _margins(rng, 5, 4, np.asarray(labels))
  expected = np.mean(optax.softmax_cross_entropy_with_integer_labels(-margins, labels))
  np.testing.assert_allclose(losses.robust_cross_entropy(margins), expected, rtol=1e-6)
  # By hand in float64: log(sum_j exp(-m_j)) since the true class has logit 0.
  m = np.asarray(margins, np.float64)
  np.testing.assert_allclose(losses.robust_cross_entropy(margins),
                             np.mean(np.log(np.exp(-m).sum(1))), rtol=1e-6)
  # Larger margins -> smaller loss; all margins very large -> loss -> 0.
  assert losses.robust_cross_entropy(margins + 1.0 - jax.nn.one_hot(labels, 4)) < \
      losses.robust_cross_entropy(margins)
  big = 50.0 * (1 - jax.nn.one_hot(labels, 4))
  assert float(losses.robust_cross_entropy(big)) < 1e-15


def test_natural_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(6, 5)).astype(np.float32))
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  lg = np.asarray(logits, np.float64)
  p = np.exp(lg - lg.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = -np.mean(np.log(p[np.arange(6), np.asarray(labels)]))
  np.testing.assert_allclose(losses.natural_cross_entropy(logits, labels), expected, rtol=1e-5)


class _Tiny(nn.Module):
  """A small certified classifier ending in the elided last layer."""

  @nn.compact
  def __call__(self, x, labels=None):
    x = layers.ReLU()(layers.Dense(6)(layers.Flatten()(x)))
    return layers.ElidedDense(3)(x, labels)


def test_zero_width_robust_loss_is_the_natural_loss():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 2)), jnp.float32)
  labels = jnp.array([0, 2, 1, 2])
  model = _Tiny()
  variables = model.init(key(1), x)
  logits = model.apply(variables, x)
  natural = losses.natural_cross_entropy(logits, labels)
  margins = model.apply(variables, Interval(x, x), labels)
  np.testing.assert_allclose(losses.robust_cross_entropy(margins), natural, rtol=1e-5, atol=1e-6)
  # A box with width: the bound-based loss is an upper bound, strictly larger.
  wide = model.apply(variables, Interval(x - 0.1, x + 0.1), labels)
  assert float(losses.robust_cross_entropy(wide)) > float(natural) + 1e-4
  assert np.all(np.asarray(wide) <= np.asarray(margins) + 1e-6)


def test_mixed_loss():
  nat, rob = jnp.float32(0.7), jnp.float32(2.3)
  np.testing.assert_allclose(losses.mixed_loss(nat, rob, 1.0), 0.7)
  np.testing.assert_allclose(losses.mixed_loss(nat, rob, 0.0), 2.3)
  np.testing.assert_allclose(losses.mixed_loss(nat, rob, 0.25), 0.25 * 0.7 + 0.75 * 2.3, rtol=1e-6)
  # Differentiable in both losses with weights kappa, 1 - kappa.
  g = jax.grad(lambda a, b: losses.mixed_loss(a, b, 0.3), argnums=(0, 1))(nat, rob)
  np.testing.assert_allclose(g, (0.3, 0.7), rtol=1e-6)


def _box(radius, shape=(2, 3)):
  c = jnp.linspace(-1.0, 1.0, int(np.prod(shape))).reshape(shape)
  return Interval(c - radius, c + radius)


def test_tightness_regulariser_by_hand():
  tau = 0.5
  inp = _box(0.1)  # mean input radius 0.1
  # Layer radii 0.1 (ratio 1 >= tau: hinge 0) and 0.4 / 1.0 (ratios 0.25 / 0.1).
  tight, mid, loose = _box(0.1, (4,)), _box(jnp.array([0.2, 0.6]), (2,)), _box(1.0, (5,))
  np.testing.assert_allclose(losses.tightness_regulariser(inp, [tight], tau), 0.0, atol=1e-7)
  expected = np.mean([0.0, (tau - 0.1 / 0.4) / tau, (tau - 0.1 / 1.0) / tau])
  np.testing.assert_allclose(losses.tightness_regulariser(inp, [tight, mid, loose], tau),
                             expected, rtol=1e-5)
  # The hinge is exactly 0 whenever every ratio is above tau.
  above = [_box(0.15), _box(0.19)]  # ratios 0.67, 0.53 > 0.5
  assert float(losses.tightness_regulariser(inp, above, tau)) == 0.0
  # And it grows once a ratio falls below tau.
  assert float(losses.tightness_regulariser(inp, [_box(0.21)], tau)) > 0.0
  # A point layer (radius 0): t is clamped to 1e-12, the ratio is huge, hinge 0.
  assert float(losses.tightness_regulariser(inp, [_box(0.0)], tau)) == 0.0
  # No ReLU layers: zero.
  assert float(losses.tightness_regulariser(inp, [], tau)) == 0.0


def _bounds(pairs):
  """``[(lower, upper), ...]`` -> Interval of shape (n,)."""
  lo, up = np.asarray(pairs, np.float32).T
  return Interval(jnp.asarray(lo), jnp.asarray(up))


# Worked by hand from the published definition (regularization.py, compute_reg):
# (l, u) -> centre c; A = [l > 0], I = [u < 0].
#   (3, 5) c=4 active; (-1.5, -0.5) c=-1 inactive; (-2, 2) c=0; (-1, 3) c=1
#   (c > 0 but l < 0: neither mask).
#   mean_act = 4/4 = 1, mean_inact = -1/4 -> ratio 4, folded 1/4:
#     relu(0.5 - 0.25)/0.5 = 0.5.
#   mean(c) = (4 - 1 + 0 + 1)/4 = 1; (c - 1)^2 = 9, 4, 1, 0:
#     var_act = 9, var_inact = 4 -> ratio 4/9: relu(0.5 - 4/9)/0.5 = 1/9.
#   term = 0.5 + 1/9.
LAYER_A = [(3.0, 5.0), (-1.5, -0.5), (-2.0, 2.0), (-1.0, 3.0)]
TERM_A = 0.5 + 1 / 9
# No inactive unit: the published mean ratio is mean_act / -0.0 = -inf -> skipped.
LAYER_NO_INACTIVE = [(1.0, 2.0), (-1.0, 1.0)]
# No active unit: mean ratio 0 and variance ratio 0 -> full penalty 1 + 1 = 2.
#   c = -1.5, 0; inactive: (-2, -1) only.
LAYER_NO_ACTIVE = [(-2.0, -1.0), (-1.0, 1.0)]


def _balance_reference(lower, upper, tau):
  """The published per-layer term in float64 NumPy, IEEE semantics included
  (``-mean_inact`` is ``-0.0`` when no unit is inactive); None if skipped."""
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  c = (lower + upper) / 2
  act, inact = (lower > 0).astype(np.float64), (upper < 0).astype(np.float64)
  mean_act, mean_inact = np.mean(c * act), np.mean(c * inact) + 0.0  # + 0.0: no -0.0 sum
  d = (c - c.mean()) ** 2
  with np.errstate(divide='ignore', invalid='ignore'):
    mean_r = mean_act / -mean_inact
    var_r = np.sum(d * act) / np.sum(d * inact)
    fold = lambda r: np.minimum(r, 1 / np.maximum(r, 1e-12))
    term = (max(tau - fold(mean_r), 0) + max(tau - fold(var_r), 0)) / tau
  return term if np.isfinite(term) else None


def test_relu_balance_term_worked_by_hand():
  tau = 0.5
  term, counted = losses.relu_balance_term(_bounds(LAYER_A), tau)
  np.testing.assert_allclose(term, TERM_A, rtol=1e-6)
  assert bool(counted)
  np.testing.assert_allclose(_balance_reference(*np.asarray(LAYER_A).T, tau), TERM_A)
  term, counted = losses.relu_balance_term(_bounds(LAYER_NO_INACTIVE), tau)
  assert not bool(counted) and float(term) == 0.0
  assert _balance_reference(*np.asarray(LAYER_NO_INACTIVE).T, tau) is None
  term, counted = losses.relu_balance_term(_bounds(LAYER_NO_ACTIVE), tau)
  assert bool(counted) and float(term) == pytest.approx(2.0)
  assert _balance_reference(*np.asarray(LAYER_NO_ACTIVE).T, tau) == pytest.approx(2.0)
  # Means and variances pool the batch with the features: a (2, 2) layout of
  # the same four units gives the same term.
  lo, up = np.asarray(LAYER_A, np.float32).T
  term, _ = losses.relu_balance_term(Interval(lo.reshape(2, 2), up.reshape(2, 2)), tau)
  np.testing.assert_allclose(term, TERM_A, rtol=1e-6)
  # Only the masks and centres matter: widening the unstable units changes nothing.
  wider = [(3.0, 5.0), (-1.5, -0.5), (-7.0, 7.0), (-4.0, 6.0)]
  np.testing.assert_allclose(losses.relu_balance_term(_bounds(wider), tau)[0], TERM_A, rtol=1e-6)


def test_relu_balance_regulariser_averages_over_all_relu_layers():
  tau = 0.5
  layers_ = [_bounds(LAYER_A), _bounds(LAYER_NO_INACTIVE), _bounds(LAYER_NO_ACTIVE)]
  # The skipped layer adds nothing but still counts in the denominator.
  np.testing.assert_allclose(losses.relu_balance_regulariser(layers_, tau),
                             (TERM_A + 0.0 + 2.0) / 3, rtol=1e-6)
  assert float(losses.relu_balance_regulariser([], tau)) == 0.0
  # Balanced layer: equal means and variances of the two parts -> 0.
  balanced = Interval.from_centre_radius(jnp.array([1.0, -1.0, 2.0, -2.0]), 0.3)
  assert float(losses.relu_balance_regulariser([balanced], tau)) == pytest.approx(0.0, abs=1e-7)
  # The gradient is finite, also through a skipped layer.
  grad = jax.grad(lambda s: losses.relu_balance_regulariser(
      [Interval(b.lower * s, b.upper * s) for b in layers_], tau))(1.0)
  assert np.isfinite(float(grad))
  grad_skipped = jax.grad(lambda lo: losses.relu_balance_regulariser(
      [Interval(lo, _bounds(LAYER_NO_INACTIVE).upper)], tau))(_bounds(LAYER_NO_INACTIVE).lower)
  np.testing.assert_array_equal(grad_skipped, 0.0)


def test_relu_balance_regulariser_matches_numpy_reference_on_random_layers():
  tau = 0.5
  rng = np.random.default_rng(3)
  layers_, terms = [], []
  for shift in (-1.0, -0.3, 0.0, 0.4, 1.2, 3.0):  # from mostly inactive to all active
    c = rng.normal(shift, 1.0, size=(4, 7)).astype(np.float32)
    r = np.abs(rng.normal(0.0, 0.5, size=(4, 7))).astype(np.float32)
    lo, up = c - r, c + r
    layers_.append(Interval(jnp.asarray(lo), jnp.asarray(up)))
    ref = _balance_reference(lo, up, tau)
    terms.append(0.0 if ref is None else ref)
    term, counted = losses.relu_balance_term(layers_[-1], tau)
    assert bool(counted) == (ref is not None)
    np.testing.assert_allclose(term, terms[-1], rtol=1e-4, atol=1e-6)
  assert any(t > 0 for t in terms)
  np.testing.assert_allclose(losses.relu_balance_regulariser(layers_, tau), np.mean(terms),
                             rtol=1e-4, atol=1e-6)


def test_warmup_regulariser_is_tightness_plus_balance():
  inp, pre = _box(0.1), [_bounds(LAYER_A), _bounds(LAYER_NO_ACTIVE)]
  np.testing.assert_allclose(
      losses.warmup_regulariser(inp, pre, 0.5),
      losses.tightness_regulariser(inp, pre, 0.5) + (TERM_A + 2.0) / 2, rtol=1e-6)


@pytest.mark.parametrize('eps,expected', [(0.0, 0.5), (8 / 255 / 2, 0.25), (8 / 255, 0.0)])
def test_warmup_weight(eps, expected):
  np.testing.assert_allclose(losses.warmup_weight(eps, 8 / 255, 0.5), expected, atol=1e-7)
