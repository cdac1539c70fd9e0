"""Tests of the `Interval` pytree, `checked`, `linf_ball`, and misuse of an Interval as an array."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import layers, solvers
from cerdeq_jax.interval import Interval, checked, linf_ball
from conftest import jit


def test_centre_radius_round_trip(rng):
  lo = rng.normal(size=(3, 4)).astype(np.float32)
  up = lo + rng.uniform(0, 2, size=(3, 4)).astype(np.float32)
  box = Interval(jnp.asarray(lo), jnp.asarray(up))
  np.testing.assert_allclose(box.centre, (lo + up) / 2, rtol=1e-6)
  np.testing.assert_allclose(box.radius, (up - lo) / 2, rtol=1e-6)
  back = Interval.from_centre_radius(box.centre, box.radius)
  np.testing.assert_allclose(back.lower, lo, atol=1e-6)
  np.testing.assert_allclose(back.upper, up, atol=1e-6)
  assert box.shape == (3, 4)
  point = Interval.point(jnp.asarray(lo))
  np.testing.assert_array_equal(point.radius, 0)
  assert bool(box.contains(jnp.asarray((lo + up) / 2)))
  assert not bool(box.contains(jnp.asarray(up + 1e-3)))


def test_interval_is_a_pytree():
  box = Interval(jnp.zeros(3), jnp.ones(3))
  leaves = jax.tree_util.tree_leaves(box)
  assert len(leaves) == 2
  doubled = jax.tree_util.tree_map(lambda a: 2 * a, box)
  assert isinstance(doubled, Interval)
  np.testing.assert_array_equal(doubled.upper, 2 * np.ones(3))
  out = jax.jit(lambda b: Interval(b.lower - 1, b.upper + 1))(box)
  np.testing.assert_array_equal(out.lower, -np.ones(3))


@pytest.mark.parametrize('lower, upper, match', [
    (np.zeros((2, 3)), np.ones((3, 2)), 'shape'),
    (np.array([0.0, 2.0]), np.array([1.0, 1.0]), 'lower > upper'),
    (np.array([0.0, np.nan]), np.array([1.0, 1.0]), 'non-finite'),
    (np.array([0.0, 0.0]), np.array([1.0, np.inf]), 'non-finite'),
    (np.array([-np.inf, 0.0]), np.array([1.0, 1.0]), 'non-finite'),
])
def test_checked_rejects_bad_bounds(lower, upper, match):
  with pytest.raises(ValueError, match=match) as info:
    checked(lower, upper)
  assert '\n' not in str(info.value)


def test_checked_accepts_good_bounds():
  box = checked(np.zeros(3), np.array([0.0, 1.0, 2.0]))
  assert isinstance(box, Interval)
  np.testing.assert_array_equal(box.upper, [0.0, 1.0, 2.0])
  # Under jit only shapes can be checked; concrete-value checks are skipped.
  out = jax.jit(lambda a, b: checked(a, b).upper)(jnp.zeros(2), jnp.ones(2))
  np.testing.assert_array_equal(out, [1.0, 1.0])


def test_linf_ball_radius_is_eps_over_std_per_channel(rng):
  mean = np.array([0.4914, 0.4822, 0.4465])
  std = np.array([0.2023, 0.1994, 0.2010])
  pixels = rng.uniform(0.2, 0.8, size=(2, 4, 4, 3))  # far from the clipping edges
  x = (pixels - mean) / std
  eps = 8 / 255
  box = linf_ball(jnp.asarray(x, jnp.float32), eps, mean, std)
  expected = np.broadcast_to(eps / std, x.shape)
  np.testing.assert_allclose(box.radius, expected, rtol=1e-5)
  np.testing.assert_allclose(box.centre, x, atol=1e-5)
  # In pixel units the box is exactly [pixels - eps, pixels + eps].
  np.testing.assert_allclose(np.asarray(box.lower) * std + mean, pixels - eps, atol=1e-5)
  np.testing.assert_allclose(np.asarray(box.upper) * std + mean, pixels + eps, atol=1e-5)


def test_linf_ball_clips_to_valid_pixel_range():
  mean = np.array([0.5, 0.25])
  std = np.array([0.5, 0.25])
  pixels = np.array([[[[0.0, 1.0], [0.01, 0.995], [0.5, 0.5]]]])  # (1, 1, 3, 2)
  x = (pixels - mean) / std
  eps = 0.03
  box = linf_ball(jnp.asarray(x, jnp.float32), eps, mean, std)
  lo_pix = np.asarray(box.lower) * std + mean
  up_pix = np.asarray(box.upper) * std + mean
  np.testing.assert_allclose(lo_pix, np.clip(pixels - eps, 0, 1), atol=1e-6)
  np.testing.assert_allclose(up_pix, np.clip(pixels + eps, 0, 1), atol=1e-6)
  assert np.all(lo_pix >= -1e-6) and np.all(up_pix <= 1 + 1e-6)


def test_linf_ball_scalar_constants_and_dense_input():
  x = jnp.array([[0.1, 0.5, 0.95]])
  box = linf_ball(x, 0.1)
  np.testing.assert_allclose(box.lower, [[0.0, 0.4, 0.85]], atol=1e-6)
  np.testing.assert_allclose(box.upper, [[0.2, 0.6, 1.0]], atol=1e-6)


def test_linf_ball_zero_eps_is_a_point():
  x = jnp.array([[0.1, 0.5]])
  box = linf_ball(x, 0.0)
  np.testing.assert_array_equal(box.lower, box.upper)
  np.testing.assert_allclose(box.lower, x)


@pytest.mark.parametrize('eps', [-1e-3, float('nan'), float('inf')])
def test_linf_ball_rejects_bad_eps(eps):
  with pytest.raises(ValueError, match='eps'):
    linf_ball(jnp.zeros((1, 2)), eps)


def test_linf_ball_rejects_nonpositive_std():
  with pytest.raises(ValueError, match='std'):
    linf_ball(jnp.zeros((1, 2)), 0.1, mean=0.0, std=[1.0, 0.0])


def test_linf_ball_rejects_integer_pixels_and_channel_mismatch():
  with pytest.raises(ValueError, match='normalised float'):
    linf_ball(jnp.zeros((1, 2, 2, 3), jnp.uint8), 0.1)
  # 3 channel constants for a 1-channel input would broadcast to 3 channels.
  with pytest.raises(ValueError, match='mean has 3 entries but x has 1'):
    linf_ball(jnp.zeros((1, 2, 2, 1)), 0.1, mean=[0.5] * 3, std=0.2)
  with pytest.raises(ValueError, match='std has 2 entries'):
    linf_ball(jnp.zeros((1, 3)), 0.1, std=[0.2, 0.3])


# --- misuse: an Interval is not an array -------------------------------------------

def _box():
  return linf_ball(jnp.zeros((2, 4, 4, 3)), 0.1)


@pytest.mark.parametrize('misuse, names', [
    (lambda box: nn.Dense(3).init(jax.random.PRNGKey(0), box), 'cerdeq_jax.layers.Dense'),
    (lambda box: nn.Conv(3, (3, 3)).init(jax.random.PRNGKey(0), box), 'cerdeq_jax.layers.Conv'),
    (lambda box: nn.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), box),
     'cerdeq_jax.layers.BatchNorm'),
    (jnp.tanh, 'box.map(jnp.tanh)'),
    (jax.nn.relu, 'cerdeq_jax.layers.ReLU()'),
    (jnp.asarray, 'cerdeq_jax.layers (Dense, Conv'),
    (jnp.array, 'cerdeq_jax.layers (Dense, Conv'),
    (np.asarray, 'cerdeq_jax.layers (Dense, Conv'),
    (lambda box: jnp.ones(3) * box, 'cerdeq_jax.layers (Dense, Conv'),
    (lambda box: jnp.sum(box), 'cerdeq_jax.layers (Dense, Conv'),
])
def test_stock_layers_and_jnp_refuse_an_interval_naming_the_certified_layer(misuse, names):
  # Before: nn.Dense and jnp.asarray silently stacked (lower, upper) into one
  # array of shape (2, ...); nn.Conv failed on a missing `ndim`.
  with pytest.raises(TypeError) as info:
    misuse(_box())
  assert names in str(info.value) and 'Interval' in str(info.value), str(info.value)


@pytest.mark.parametrize('op', [lambda b: b * 2, lambda b: 2 * b, lambda b: b + 1.0,
                                lambda b: 1.0 + b, lambda b: b - 1, lambda b: -b])
def test_arithmetic_operators_refuse_an_interval(op):
  with pytest.raises(TypeError, match='cerdeq_jax.ibp'):
    op(_box())


def test_interval_stays_a_tuple_for_generic_code():
  box = _box()
  lower, upper = box
  assert lower is box.lower and upper is box.upper
  assert len((None,) + box) == 3 and len(box + (None,)) == 3
  assert box.ndim == 4 and box._replace(upper=box.lower).upper is box.lower


def test_certified_layers_still_take_intervals():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, labels=None):
      x = layers.DEQ(4, solver=solvers.Anderson(tol=1e-5, max_iter=60))(x)
      x = layers.BatchNorm(use_running_average=True)(layers.Conv(4, (2, 2))(x))
      x = layers.Flatten()(layers.AvgPool()(layers.ReLU()(x)))
      x = layers.Activation(jnp.tanh)(layers.Dense(8)(x))
      return layers.ElidedDense(3)(x, labels)

  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32))
  labels = jnp.array([0, 2])
  net = Net()
  variables = jit(lambda k: net.init(k, x))(jax.random.PRNGKey(0))
  apply = jit(lambda v, z: net.apply(v, z, labels))
  logits = apply(variables, x)
  margins = apply(variables, linf_ball(x, 0.01))
  nominal = logits[jnp.arange(2), labels][:, None] - logits
  assert margins.shape == (2, 3) and bool(jnp.all(jnp.isfinite(margins)))
  assert bool(jnp.all(margins <= nominal + 1e-5))


def test_linf_ball_rejects_inputs_outside_the_pixel_range():
  mean, std = np.array([0.5]), np.array([0.25])
  # Pixel 1.2 normalises to 2.8 > (1 - 0.5) / 0.25 = 2: clipping the box to the
  # valid range would give [2, 2] at ε = 0 — an interval that does not contain x.
  x = jnp.asarray((np.array([[[[0.3], [1.2]]]]) - mean) / std, jnp.float32)
  with pytest.raises(ValueError, match=r'x has 1 value\(s\) outside the pixel range'):
    linf_ball(x, 0.0, mean, std)
  # Pixels 0 and 1 exactly, after float32 rounding, are inside.
  edge = jnp.asarray((np.array([[[[0.0], [1.0]]]]) - mean) / std, jnp.float32)
  box = linf_ball(edge, 0.0, mean, std)
  assert np.all(np.asarray(box.lower) <= np.asarray(edge))
  assert np.all(np.asarray(edge) <= np.asarray(box.upper) + 1e-6)
  # Inside a jit x is traced and cannot be checked: the box is built as is.
  jax.jit(lambda v: linf_ball(v, 0.0, mean, std))(x)
