"""Soundness and tightness of the IBP rules against independent computations.

* Every single layer: the library's bounds equal the exact per-coordinate
  bounds computed independently (W+/W- form for linear maps, end points for
  monotone maps), so they are neither unsound nor loose.
* A random small network: outputs of points sampled in the box, of the box
  corners and of PGD points (maximising and minimising output coordinates)
  lie inside the propagated bounds at every layer.
* `elided_margins` equals the exact minimum over the box (corner enumeration).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cerdeq_jax import ibp
from cerdeq_jax.interval import Interval

try:
  from tests import conftest as H
except ImportError:  # pragma: no cover
  import conftest as H

ATOL = 2e-5  # float32 rounding of a few layers


def _pos_neg(w):
  return np.maximum(w, 0), np.minimum(w, 0)


def _random_box(rng, shape, max_width=1.0):
  centre = rng.normal(size=shape).astype(np.float32)
  radius = rng.uniform(0, max_width / 2, size=shape).astype(np.float32)
  return Interval(jnp.asarray(centre - radius), jnp.asarray(centre + radius))


def _assert_same_box(box, lower, upper, atol=ATOL):
  np.testing.assert_allclose(box.lower, lower, atol=atol, rtol=1e-5)
  np.testing.assert_allclose(box.upper, upper, atol=atol, rtol=1e-5)


# --- hand-computed case ---

def test_dense_hand_computed():
  # x1 in [0, 1], x2 in [-1, 1];  out_j = sum_i x_i W[i, j] + b_j
  # W = [[1, -2], [3, 4]], b = [0.5, -1]
  # out_1 = x1 + 3 x2 + 0.5:    max 1 + 3 + 0.5 = 4.5,   min 0 - 3 + 0.5 = -2.5
  # out_2 = -2 x1 + 4 x2 - 1:   max 0 + 4 - 1 = 3,       min -2 - 4 - 1 = -7
  # relu: [0, 4.5] and [0, 3]
  box = Interval(jnp.array([[0.0, -1.0]]), jnp.array([[1.0, 1.0]]))
  out = ibp.dense(box, jnp.array([[1.0, -2.0], [3.0, 4.0]]), jnp.array([0.5, -1.0]))
  np.testing.assert_allclose(out.lower, [[-2.5, -7.0]], atol=1e-6)
  np.testing.assert_allclose(out.upper, [[4.5, 3.0]], atol=1e-6)
  out = ibp.relu(out)
  np.testing.assert_allclose(out.lower, [[0.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(out.upper, [[4.5, 3.0]], atol=1e-6)


# --- single layers: exact bounds computed independently ---

CONV_CASES = [
    # (kernel hw, strides, padding, in spatial)
    (3, (2, 2), 'VALID', 7),
    (3, (2, 2), 'SAME', 6),
    (3, (1, 1), 'SAME', 5),   # the custom-VJP `same_conv` path
    (2, (1, 1), 'SAME', 5),   # even kernel: asymmetric padding
    (3, (1, 1), 'VALID', 5),
    (3, (1, 1), ((2, 0), (1, 1)), 5),  # explicit padding
]


@pytest.mark.parametrize('k, strides, padding, size', CONV_CASES)
def test_conv_bounds_are_exact(rng, k, strides, padding, size):
  box = _random_box(rng, (2, size, size, 3))
  kernel = rng.normal(size=(k, k, 3, 4)).astype(np.float32)
  bias = rng.normal(size=(4,)).astype(np.float32)
  out = ibp.conv(box, jnp.asarray(kernel), jnp.asarray(bias), strides, padding)
  kp, kn = _pos_neg(kernel)
  conv = lambda x, w: H.ref_conv(x, jnp.asarray(w), strides, padding)
  upper = conv(box.upper, kp) + conv(box.lower, kn) + bias
  lower = conv(box.lower, kp) + conv(box.upper, kn) + bias
  _assert_same_box(out, lower, upper)
  # The nominal image of the centre is the centre of the bounds.
  np.testing.assert_allclose(out.centre, conv(box.centre, kernel) + bias, atol=ATOL)


def test_dense_bounds_are_exact(rng):
  box = _random_box(rng, (3, 6))
  kernel = rng.normal(size=(6, 5)).astype(np.float32)
  bias = rng.normal(size=(5,)).astype(np.float32)
  out = ibp.dense(box, jnp.asarray(kernel), jnp.asarray(bias))
  kp, kn = _pos_neg(kernel)
  lo, up = np.asarray(box.lower), np.asarray(box.upper)
  _assert_same_box(out, lo @ kp + up @ kn + bias, up @ kp + lo @ kn + bias)
  # ... and each bound is attained: enumerate the 2^6 corners.
  corners = np.array(list(itertools.product([0, 1], repeat=6)), np.float32)  # (64, 6)
  points = lo[:, None] + corners[None] * (up - lo)[:, None]  # (3, 64, 6)
  values = points @ kernel + bias
  np.testing.assert_allclose(out.upper, values.max(1), atol=ATOL)
  np.testing.assert_allclose(out.lower, values.min(1), atol=ATOL)


def test_scale_shift_with_negative_scales(rng):
  box = _random_box(rng, (2, 3, 3, 4))
  scale = np.array([1.5, -0.5, 0.0, -2.0], np.float32)
  shift = rng.normal(size=(4,)).astype(np.float32)
  out = ibp.scale_shift(box, jnp.asarray(scale), jnp.asarray(shift))
  lo, up = np.asarray(box.lower), np.asarray(box.upper)
  a, b = lo * scale + shift, up * scale + shift
  _assert_same_box(out, np.minimum(a, b), np.maximum(a, b))


@pytest.mark.parametrize('name', ['relu', 'tanh', 'max_pool', 'max_pool_same', 'avg_pool',
                                  'avg_pool_same', 'flatten'])
def test_monotone_and_positive_layers_map_the_ends(rng, name):
  box = _random_box(rng, (2, 5, 5, 3))
  ref = {
      'relu': lambda z: jnp.maximum(z, 0),
      'tanh': np.tanh,
      'max_pool': lambda z: lax.reduce_window(z, -jnp.inf, lax.max, (1, 2, 2, 1),
                                              (1, 1, 1, 1), 'VALID'),
      'max_pool_same': lambda z: lax.reduce_window(z, -jnp.inf, lax.max, (1, 3, 3, 1),
                                                   (1, 2, 2, 1), 'SAME'),
      'avg_pool': lambda z: lax.reduce_window(z, 0.0, lax.add, (1, 2, 2, 1),
                                              (1, 2, 2, 1), 'VALID') / 4,
      # flax's default count_include_pad=True: divide by the window size.
      'avg_pool_same': lambda z: lax.reduce_window(z, 0.0, lax.add, (1, 3, 3, 1),
                                                   (1, 1, 1, 1), 'SAME') / 9,
      'flatten': lambda z: np.reshape(z, (z.shape[0], -1)),
  }[name]
  lib = {
      'relu': ibp.relu,
      'tanh': lambda b: ibp.monotone(b, jnp.tanh),
      'max_pool': lambda b: ibp.max_pool(b, (2, 2), (1, 1)),
      'max_pool_same': lambda b: ibp.max_pool(b, (3, 3), (2, 2), 'SAME'),
      'avg_pool': lambda b: ibp.avg_pool(b, (2, 2), (2, 2)),
      'avg_pool_same': lambda b: ibp.avg_pool(b, (3, 3), (1, 1), 'SAME'),
      'flatten': ibp.flatten,
  }[name]
  out = lib(box)
  _assert_same_box(out, ref(box.lower), ref(box.upper), atol=1e-6)


def test_add_bounds():
  a = Interval(jnp.array([0.0, -1.0]), jnp.array([1.0, 2.0]))
  b = Interval(jnp.array([-3.0, 0.5]), jnp.array([-2.0, 0.75]))
  out = ibp.add(a, b)
  np.testing.assert_allclose(out.lower, [-3.0, -0.5])
  np.testing.assert_allclose(out.upper, [-1.0, 2.75])


# --- a random network with every layer type ---

def _net_params(rng):
  f = lambda *s, scale=0.5: jnp.asarray(rng.normal(size=s).astype(np.float32) * scale)
  return dict(
      k1=f(3, 3, 2, 4), b1=f(4),
      scale=jnp.array([1.2, -0.7, 0.3, -1.5], jnp.float32), shift=f(4),
      k2=f(3, 3, 4, 4, scale=0.3),
      k3=f(2, 2, 4, 3), k4=f(3, 3, 3, 3), b4=f(3),
      w5=f(3, 5), b5=f(5),
      w6=f(5, 4), b6=f(4))


def _ref_forward(p, x):
  """Independent forward pass (lax only); returns every activation."""
  acts = []
  h = H.ref_conv(x, p['k1'], (2, 2), 'VALID') + p['b1']            # 9 -> 4
  acts.append(h)
  h = h * p['scale'] + p['shift']
  acts.append(h)
  a = jnp.maximum(h, 0)
  acts.append(a)
  h = a + H.ref_conv(a, p['k2'])                                     # residual
  acts.append(h)
  h = jnp.tanh(h)
  acts.append(h)
  h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1), 'VALID')  # 4 -> 3
  acts.append(h)
  h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 1, 1, 1), 'VALID') / 4  # 3 -> 2
  acts.append(h)
  h = H.ref_conv(h, p['k3'])                                         # even kernel SAME
  acts.append(h)
  h = H.ref_conv(h, p['k4'], (2, 2), 'SAME') + p['b4']               # 2 -> 1
  acts.append(h)
  h = h.reshape(h.shape[0], -1)
  acts.append(h)
  h = h @ p['w5'] + p['b5']
  acts.append(h)
  h = jnp.maximum(h, 0)
  acts.append(h)
  return acts


def _ibp_forward(p, box):
  acts = []
  h = ibp.conv(box, p['k1'], p['b1'], (2, 2), 'VALID')
  acts.append(h)
  h = ibp.scale_shift(h, p['scale'], p['shift'])
  acts.append(h)
  a = ibp.relu(h)
  acts.append(a)
  h = ibp.add(a, ibp.conv(a, p['k2']))
  acts.append(h)
  h = ibp.monotone(h, jnp.tanh)
  acts.append(h)
  h = ibp.max_pool(h, (2, 2), (1, 1))
  acts.append(h)
  h = ibp.avg_pool(h, (2, 2), (1, 1))
  acts.append(h)
  h = ibp.conv(h, p['k3'])
  acts.append(h)
  h = ibp.conv(h, p['k4'], p['b4'], (2, 2), 'SAME')
  acts.append(h)
  h = ibp.flatten(h)
  acts.append(h)
  h = ibp.dense(h, p['w5'], p['b5'])
  acts.append(h)
  h = ibp.relu(h)
  acts.append(h)
  return acts


def _assert_inside(bounds, acts, what):
  for i, (box, act) in enumerate(zip(bounds, acts)):
    act = np.asarray(act)
    lo = np.asarray(box.lower)
    up = np.asarray(box.upper)
    below = np.max(lo - act)
    above = np.max(act - up)
    assert below <= ATOL and above <= ATOL, (
        f'{what}: layer {i} leaves the bounds by {max(below, above):.3g}')


@pytest.fixture(scope='module')
def net():
  rng = np.random.default_rng(1)
  params = _net_params(rng)
  box = _random_box(rng, (2, 9, 9, 2), max_width=0.6)
  bounds = H.jit(_ibp_forward)(params, box)
  return params, box, bounds


def test_network_outputs_of_sampled_points_are_inside(net):
  params, box, bounds = net
  pts = H.uniform_in_box(np.random.default_rng(10), box.lower, box.upper, 256)
  acts = H.jit(jax.vmap(lambda x: _ref_forward(params, x)))(pts)
  _assert_inside([Interval(b.lower[None], b.upper[None]) for b in bounds], acts, 'uniform')
  # Corners of the box (random vertices) too.
  bits = np.random.default_rng(11).uniform(size=(64,) + box.shape) < 0.5
  corners = jnp.where(bits, box.upper, box.lower)
  acts = H.jit(jax.vmap(lambda x: _ref_forward(params, x)))(corners)
  _assert_inside([Interval(b.lower[None], b.upper[None]) for b in bounds], acts, 'corners')
  # Sanity: the bounds are not absurdly loose for the first (exact) layer.
  np.testing.assert_array_less(np.asarray(bounds[0].upper - bounds[0].lower), 50.0)


# --- elided margins ---

def _margin_problem(rng, n=3, d=4, k=3):
  box = _random_box(rng, (n, d), max_width=1.5)
  kernel = jnp.asarray(rng.normal(size=(d, k)).astype(np.float32))
  bias = jnp.asarray(rng.normal(size=(k,)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, k, size=(n,)))
  return box, kernel, bias, labels


def test_margins_from_logits_matches_numpy(rng):
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(4,))
  m = ibp.margins_from_logits(jnp.asarray(logits), jnp.asarray(labels))
  expected = np.array([[logits[i, labels[i]] - logits[i, j] for j in range(5)] for i in range(4)])
  np.testing.assert_allclose(m, expected, atol=1e-6)


def test_elided_margins_equal_exact_minimum_over_corners(rng):
  box, kernel, bias, labels = _margin_problem(rng, d=5)
  bound = np.asarray(H.jit(ibp.elided_margins)(box, kernel, bias, labels))
  w, b = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
  lo, up = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  bits = np.array(list(itertools.product([0, 1], repeat=lo.shape[1])))
  for n in range(lo.shape[0]):
    corners = lo[n] + bits * (up[n] - lo[n])
    logits = corners @ w + b
    margins = logits[:, labels[n]][:, None] - logits
    np.testing.assert_allclose(bound[n], margins.min(0), atol=1e-5)
    assert bound[n, int(labels[n])] == 0.0


def test_elided_margins_sound_and_tighter_than_logit_bounds(rng):
  box, kernel, bias, labels = _margin_problem(rng, n=4, d=6, k=4)
  margins = lambda z: ibp.margins_from_logits(z @ kernel + bias, labels)

  @H.jit
  def run(box, uniform, starts):
    bound = ibp.elided_margins(box, kernel, bias, labels)
    logit_box = ibp.dense(box, kernel, bias)
    naive = jnp.take_along_axis(logit_box.lower, labels[:, None], 1) - logit_box.upper
    # PGD minimising each margin j (linear: PGD reaches the minimum).
    attack = lambda j, x0: H.pgd_maximise(lambda z: -jnp.sum(margins(z)[:, j]),
                                          box.lower, box.upper, x0)
    pgd = jax.vmap(attack)(jnp.arange(4), starts)
    return bound, naive, jax.vmap(margins)(uniform), jax.vmap(margins)(pgd)

  bound, naive, m_uniform, m_pgd = map(np.asarray, run(
      box, H.uniform_in_box(rng, box.lower, box.upper, 512),
      H.uniform_in_box(rng, box.lower, box.upper, 4)))
  np.testing.assert_array_equal(bound[np.arange(4), labels], 0.0)
  off = np.arange(4)[None, :] != np.asarray(labels)[:, None]
  assert np.all(bound[off] >= naive[off] - 1e-5)
  assert np.any(bound[off] > naive[off] + 1e-3)  # strictly tighter, somewhere
  assert np.all(m_uniform >= bound[None] - 1e-5)
  assert np.all(m_pgd >= bound[None] - 1e-5)
  attained = m_pgd[np.arange(4), :, np.arange(4)]  # (targets, N): margin j of attack j
  np.testing.assert_allclose(attained, bound.T, atol=1e-4)


def test_network_pgd_points_are_inside_bounds_and_margins(net):
  """PGD maximises and minimises every pre-activation output of the last
  dense layer and minimises every elided margin of a classifier on top;
  all activations of the points found lie in the bounds and their margins
  above the elided lower bounds."""
  params, box, bounds = net
  rng = np.random.default_rng(5)
  w6, b6 = params['w6'], params['b6']
  labels = jnp.asarray(rng.integers(0, 4, size=(2,)))
  bound = ibp.elided_margins(bounds[-1], w6, b6, labels)

  def targets(x):
    acts = _ref_forward(params, x)
    margins = ibp.margins_from_logits(acts[-1] @ w6 + b6, labels)
    return jnp.concatenate([acts[-2], margins], axis=1), acts  # (N, 5 + 4)

  out_dim = bounds[-2].shape[-1]
  eye = np.eye(out_dim + 4, dtype=np.float32)
  coeffs = np.concatenate([eye[:out_dim], -eye[:out_dim], -eye[out_dim:]])  # max, min, min
  starts = H.uniform_in_box(rng, box.lower, box.upper, len(coeffs))

  @H.jit
  def run(coeffs, starts, uniform):
    def attack(c, x0):
      return H.pgd_maximise(lambda x: jnp.sum(targets(x)[0] * c), box.lower, box.upper, x0,
                            steps=30)
    pts = jax.vmap(attack)(coeffs, starts)
    return jax.vmap(targets)(pts), jax.vmap(targets)(uniform)[0]

  uniform = H.uniform_in_box(rng, box.lower, box.upper, 128)
  (t_pgd, acts), t_uniform = run(jnp.asarray(coeffs), starts, uniform)
  _assert_inside([Interval(b.lower[None], b.upper[None]) for b in bounds], acts, 'pgd')
  margins = np.asarray(t_pgd[..., out_dim:])
  assert np.all(margins >= np.asarray(bound)[None] - ATOL)
  assert np.all(np.asarray(t_uniform[..., out_dim:]) >= np.asarray(bound)[None] - ATOL)
  # The attack does its job: on its own objective it mostly beats the best of
  # 128 uniform samples (a non-convex objective: not always).
  obj_pgd = np.einsum('cnk,ck->cn', np.asarray(t_pgd), coeffs)
  obj_uniform = np.einsum('snk,ck->csn', np.asarray(t_uniform), coeffs).max(1)
  assert np.mean(obj_pgd >= obj_uniform - 1e-5) >= 0.8


def test_elided_margins_rejects_bad_shapes():
  box = Interval(jnp.zeros((2, 3)), jnp.ones((2, 3)))
  with pytest.raises(ValueError):
    ibp.elided_margins(box, jnp.zeros((4, 2)), None, jnp.zeros(2, jnp.int32))
