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
  # No ReLU layers: zero.
  assert float(losses.tightness_regulariser(inp, [], tau)) == 0.0


def _balance_by_hand(centres, tau):
  c = np.asarray(centres, np.float64)
  pos, neg = np.maximum(c, 0), np.maximum(-c, 0)
  ratio = lambda a, b: min(a / b, b / a)
  return (max(0.0, tau - ratio(pos.mean(), neg.mean())) / tau
          + max(0.0, tau - ratio(pos.var(), neg.var())) / tau)


def test_relu_balance_regulariser_by_hand():
  tau = 0.5
  balanced = Interval.from_centre_radius(jnp.array([1.0, -1.0, 2.0, -2.0]), 0.3)
  np.testing.assert_allclose(losses.relu_balance_regulariser([balanced], tau), 0.0, atol=1e-6)
  skewed_c = jnp.array([3.0, 1.0, -1.0, 1.0])
  skewed = Interval.from_centre_radius(skewed_c, 0.5)
  # means 1.25 vs 0.25 -> ratio 0.2; variances 1.1875 vs 0.1875 -> ratio 0.158.
  expected = _balance_by_hand(skewed_c, tau)
  np.testing.assert_allclose(expected, (0.5 - 0.2) / 0.5 + (0.5 - 0.1875 / 1.1875) / 0.5)
  np.testing.assert_allclose(losses.relu_balance_regulariser([skewed], tau), expected, rtol=1e-5)
  # Averaged over layers; only the centres matter (not the radii).
  np.testing.assert_allclose(losses.relu_balance_regulariser([balanced, skewed], tau),
                             expected / 2, rtol=1e-5)
  wider = Interval.from_centre_radius(skewed_c, 5.0)
  np.testing.assert_allclose(losses.relu_balance_regulariser([wider], tau), expected, rtol=1e-5)
  # Hinge 0 when both ratios are above tau (a mildly unbalanced layer).
  mild_c = jnp.array([1.0, -0.8, 1.5, -1.2, 0.5, -0.6])
  assert _balance_by_hand(mild_c, tau) == 0.0
  assert float(losses.relu_balance_regulariser([Interval(mild_c, mild_c)], tau)) == 0.0
  assert float(losses.relu_balance_regulariser([], tau)) == 0.0


@pytest.mark.parametrize('eps,expected', [(0.0, 0.5), (8 / 255 / 2, 0.25), (8 / 255, 0.0)])
def test_warmup_weight(eps, expected):
  np.testing.assert_allclose(losses.warmup_weight(eps, 8 / 255, 0.5), expected, atol=1e-7)
