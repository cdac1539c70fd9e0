"""Tests of cerdeq_jax.parametrize and an independent check of abs_operator_bound."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import ops
from cerdeq_jax import parametrize as pz
from cerdeq_jax import deq, reparam

# Jitted once per shape: eager op-by-op dispatch dominates these small tests.
abs_operator_bound = jax.jit(deq.abs_operator_bound)


def _normal(seed, shape):
  # numpy, not jax.random: compiling threefry per shape dominates the run time.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _gram_error(q):
  q = np.asarray(q, np.float64)
  g = q.T @ q if q.shape[0] >= q.shape[1] else q @ q.T
  return np.abs(g - np.eye(g.shape[0])).max()


def _polar(m):
  u, _, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
  return u @ vt


# --- Björck ---------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(576, 64), (64, 576), (40, 40), (27, 8)])
def test_bjorck_orthonormal_and_polar(shape):
  for seed in range(3):
    m = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    q = np.asarray(pz.bjorck(m))
    assert q.shape == shape and q.dtype == np.float32
    assert _gram_error(q) < 1e-4
    # Square random matrices have a small sigma_min: compare the polar factor loosely.
    np.testing.assert_allclose(q, _polar(m), atol=1e-4 if shape[0] != shape[1] else 1e-3)


def test_bjorck_ill_conditioned():
  rng = np.random.default_rng(3)
  u, _ = np.linalg.qr(rng.standard_normal((576, 64)))
  v, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  m = ((u * np.geomspace(1.0, 1e-3, 64)) @ v.T).astype(np.float32)  # cond 1e3
  q = np.asarray(pz.bjorck(m, iters=20))
  assert _gram_error(q) < 1e-4
  np.testing.assert_allclose(q, _polar(m), atol=1e-4)


def test_bjorck_iterations_from_frobenius_scaling():
  # Documented number: a random 576x64 matrix needs 6 iterations.
  m = np.random.default_rng(0).standard_normal((576, 64)).astype(np.float32)
  assert _gram_error(pz.bjorck(m, iters=5)) > 1e-4
  assert _gram_error(pz.bjorck(m, iters=6)) < 1e-4


def test_bjorck_order2_is_brief_formula():
  a = np.random.default_rng(4).standard_normal((12, 5))
  a = a / np.linalg.norm(a)
  g = a.T @ a
  expected = 15 / 8 * a - 5 / 4 * a @ g + 3 / 8 * a @ g @ g
  got = pz.bjorck(a.astype(np.float32), iters=1, order=2)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_bjorck_kernel_flattening_and_jit():
  k = _normal(0, (3, 3, 16, 16))
  q = jax.jit(lambda k: 2.0 * pz.bjorck_kernel(k))(k) / 2.0
  assert q.shape == k.shape
  assert _gram_error(q.reshape(144, 16)) < 1e-4


# --- projections ------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(3, 3, 16, 16), (32, 32)])
def test_project_bjorck_bound(shape):
  k = _normal(1, shape)
  w = pz.project_bjorck(k, 0.9, 20)
  bound = float(abs_operator_bound(w))
  assert bound <= 0.9
  np.testing.assert_allclose(bound, 0.9, rtol=1e-4)
  # Still orthogonal up to the scalar factor: all singular values equal.
  s = np.asarray(pz.singular_values(w))
  np.testing.assert_allclose(s, s[0], rtol=1e-4)


@pytest.mark.parametrize('shape', [(3, 3, 16, 16), (5, 5, 3, 6), (32, 32)])
def test_project_weight_norm(shape):
  k = _normal(2, shape)
  w = pz.project_weight_norm(k, 0.95)
  taps = math.prod(shape[:-2])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(w)), 0.95 / math.sqrt(taps), rtol=1e-5)
  assert float(abs_operator_bound(w)) <= 0.95


def test_weight_norm_worst_case_is_tight_but_sound():
  # Equal |taps| and rank-one S: Cauchy–Schwarz and ||S||_2 <= ||S||_F are tight.
  k = jnp.ones((3, 3, 4, 4)) * jnp.array([1.0, -1.0, 1.0, -1.0])
  w = np.asarray(pz.project_weight_norm(k, 0.95), np.float64)
  s = np.abs(w).sum(axis=(0, 1))
  np.testing.assert_allclose(np.linalg.norm(s, 2), 0.95, rtol=1e-6)


def test_power_iteration_converges_across_calls():
  # A small spectral gap (3.0 vs 2.9): one call of 20 iterations is not enough.
  rng = np.random.default_rng(5)
  u, _ = np.linalg.qr(rng.standard_normal((144, 16)))
  v, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  m = (u * np.r_[3.0, 2.9, np.linspace(2.0, 0.1, 14)]) @ v.T
  kernel = jnp.asarray(m.astype(np.float32).reshape(3, 3, 16, 16))
  top = np.linalg.svd(m, compute_uv=False)[:2]
  np.testing.assert_allclose(top, [3.0, 2.9], rtol=1e-6)
  vec = pz.initial_spectral_vector(jax.random.PRNGKey(0), kernel)
  np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-6)
  sigmas = []
  for _ in range(15):  # the vector persisted across calls, as across training steps
    _, vec, sigma = pz.spectral_normalize(kernel, vec, 0.95, iters=20)
    sigmas.append(float(sigma))
  assert sigmas[0] < 3.0 * (1 - 2e-4)  # not yet converged after one call
  assert all(b >= a * (1 - 1e-6) for a, b in zip(sigmas, sigmas[1:]))  # monotone
  assert all(s <= 3.0 * (1 + 1e-5) for s in sigmas)  # a lower bound throughout
  np.testing.assert_allclose(sigmas[-1], 3.0, rtol=1e-5)
  assert abs(abs(float(vec @ v[:, 0])) - 1) < 1e-4  # u -> top right singular vector


@pytest.mark.parametrize('shape', [(3, 3, 16, 16), (32, 32)])
def test_spectral_norm_projection(shape):
  k = _normal(3, shape)
  u = pz.initial_spectral_vector(jax.random.PRNGKey(4), k)
  for _ in range(10):  # 200 power iterations in all, persisted across calls
    u_prev = u
    w_c, u = pz.project_spectral_norm(k, u, 0.95, iters=20)
  w, u_sn, sigma = pz.spectral_normalize(k, u_prev, 0.95, iters=20)
  np.testing.assert_allclose(u_sn, u, atol=1e-6)
  exact = np.linalg.norm(np.asarray(k, np.float64).reshape(-1, shape[-1]), 2)
  np.testing.assert_allclose(float(sigma), exact, rtol=1e-4)
  # Before the clamp the flattened kernel's spectral norm is the scale ...
  np.testing.assert_allclose(np.asarray(pz.singular_values(w))[0], 0.95, rtol=1e-4)
  # ... and the projection is the same W, clamped to L <= scale only where needed.
  bound_before = float(abs_operator_bound(w))
  assert float(abs_operator_bound(w_c)) <= 0.95
  if bound_before > 0.95:  # random mixed-sign kernels: ||S||_2 >> ||flat(K)||_2
    np.testing.assert_allclose(w_c, w * 0.95 / bound_before, rtol=2e-5, atol=1e-7)
  else:
    np.testing.assert_array_equal(w_c, w)


def test_spectral_clamp_does_not_fire_below_scale():
  k = 0.3 * jnp.eye(6)  # L(k) = 0.3 * (1 + 1e-4) < 0.95
  np.testing.assert_array_equal(pz.clamp_to_bound(k, 0.95), k)


def test_project_dispatch_and_validation():
  k = _normal(5, (3, 3, 16, 16))
  for method in pz.METHODS:
    w, state = pz.project(k, None, pz.Parametrization(method, 0.8, 20))
    assert w.shape == k.shape and float(abs_operator_bound(w)) <= 0.8
    assert (state is None) == (method != 'sn')
  with pytest.raises(ValueError):
    pz.project(k, None, pz.Parametrization('orthogonal'))
  for scale in (0.0, 1.0, 1.5, -0.1):
    with pytest.raises(ValueError):
      pz.project(k, None, pz.Parametrization('bjorck', scale))
  with pytest.raises(ValueError):
    pz.project_tree({'hidden_kernel': k}, None, pz.Parametrization('wn', 1.0))


def test_project_is_jittable():
  k = _normal(6, (3, 3, 16, 16))
  p = pz.Parametrization('sn', 0.9, 20)
  u = pz.initial_spectral_vector(jax.random.PRNGKey(0), k)
  w, u2 = jax.jit(pz.project, static_argnums=2)(k, u, p)
  w_ref, u_ref = pz.project(k, u, p)
  np.testing.assert_allclose(w, w_ref, rtol=1e-6)
  np.testing.assert_allclose(u2, u_ref, rtol=1e-6)


@pytest.mark.parametrize('method', pz.METHODS)
def test_project_tree_touches_only_hidden_kernels(method):
  params = {
      'stem': {'kernel': _normal(70 + 0, (3, 3, 3, 16))},
      'deq': {'hidden_kernel': _normal(70 + 1, (3, 3, 16, 16)),
              'injection': {'kernel': _normal(70 + 2, (3, 3, 3, 16)),
                            'bias': jnp.ones(16)}},
      'deq2': {'cell': {'hidden_kernel': _normal(70 + 3, (32, 32))}},
      'head': {'kernel': _normal(70 + 4, (16, 10))},
  }
  states = pz.init_spectral_states(jax.random.PRNGKey(8), params) if method == 'sn' else None
  p = pz.Parametrization(method, 0.9, 20)
  new_params, new_states = pz.project_tree(params, states, p)
  assert jax.tree_util.tree_structure(new_params) == jax.tree_util.tree_structure(params)
  for path in (('stem', 'kernel'), ('deq', 'injection', 'kernel'), ('deq', 'injection', 'bias'),
               ('head', 'kernel')):
    get = lambda t: t[path[0]][path[1]] if len(path) == 2 else t[path[0]][path[1]][path[2]]
    np.testing.assert_array_equal(get(new_params), get(params))
  for w in (new_params['deq']['hidden_kernel'], new_params['deq2']['cell']['hidden_kernel']):
    assert float(abs_operator_bound(w)) <= 0.9
  if method == 'sn':
    assert set(new_states) == {'deq', 'deq2'}
    assert new_states['deq']['hidden_kernel'].shape == (16,)
    assert new_states['deq2']['cell']['hidden_kernel'].shape == (32,)
    # Persisted vectors: a second projection starts from the returned ones.
    _, again = pz.project_tree(new_params, new_states, p)
    assert again['deq']['hidden_kernel'].shape == (16,)


# --- the rho bound ---------------------------------------------------------------

def _s_matrix(kernel):
  """S (O, I) in float64 numpy, for HWIO or dense kernels."""
  k = np.abs(np.asarray(kernel, np.float64))
  return k.reshape((-1,) + k.shape[-2:]).sum(axis=0).T


def _perron(kernel):
  """rho(S) and the right / left Perron vectors x, y of S (numpy)."""
  s = _s_matrix(kernel)
  vals, right = np.linalg.eig(s)
  vals_l, left = np.linalg.eig(s.T)
  x = np.abs(np.real(right[:, np.argmax(np.abs(vals))]))
  y = np.abs(np.real(left[:, np.argmax(np.abs(vals_l))]))
  return float(np.max(np.abs(vals))), x, y


@pytest.mark.parametrize('shape', [(3, 3, 16, 16), (32, 32)])
@pytest.mark.parametrize('method', pz.METHODS)
def test_rho_bound_projection(method, shape):
  k = _normal(20, shape)
  p = pz.Parametrization(method, 0.8, bound='rho')
  w, _ = pz.project(k, None, p)
  rho = float(pz.contraction_bound(w, 'rho'))
  assert _perron(w)[0] <= rho <= 0.8  # rigorous, and kept at the scale
  if method != 'sn':  # rescaled onto the bound (sn: clamped, if above)
    np.testing.assert_allclose(rho, 0.8, rtol=1e-4)
  if method == 'bjorck':
    s = np.asarray(pz.singular_values(w))
    np.testing.assert_allclose(s, s[0], rtol=1e-4)


def test_rho_scales_with_the_kernel():
  # The power iteration runs on S / max(S): rescaling by scale / rho lands on scale.
  k = _normal(21, (3, 3, 8, 8))
  rho = float(deq.channel_contraction(k)[1])
  for c in (1e-3, 0.37, 7.0):
    np.testing.assert_allclose(float(deq.channel_contraction(c * k)[1]), c * rho, rtol=1e-6)


def test_collatz_wielandt_bounds_rho_for_any_positive_vector():
  k = _normal(22, (3, 3, 6, 6))
  exact = _perron(k)[0]
  rng = np.random.default_rng(0)
  for _ in range(5):
    v = jnp.asarray(rng.uniform(0.01, 1.0, 6), jnp.float32)
    assert float(deq.collatz_wielandt(k, v)) >= exact
  np.testing.assert_allclose(float(deq.channel_contraction(k)[1]), exact * (1 + 1e-4), rtol=1e-5)


def test_rho_gradient_is_the_perron_root_derivative(x64):
  # v (and the left vector) held fixed, the gradient is y^T dS x / y^T x, the
  # derivative of rho(S) itself (not of one arbitrary channel's ratio).
  k = jnp.asarray(np.random.default_rng(23).standard_normal((3, 3, 5, 5)))
  grad = np.asarray(jax.grad(lambda k: deq.channel_contraction(k)[1])(k))
  _, x, y = _perron(k)
  d_s = np.outer(y, x) / (y @ x)  # d rho / d S[o, i]
  expected = d_s.T[None, None] * np.sign(np.asarray(k)) * (1 + 1e-4)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)


# --- the reparametrisation ------------------------------------------------------------

@pytest.mark.parametrize('bound', pz.BOUNDS)
@pytest.mark.parametrize('method', pz.METHODS)
def test_effective_kernel_is_contractive(method, bound):
  v = _normal(24, (3, 3, 16, 16))
  u = pz.power_iteration(pz.flatten_kernel(v), pz.initial_spectral_vector(
      jax.random.PRNGKey(0), v), 200)[1]
  p = pz.Parametrization(method, 0.9, mode='reparam', bound=bound)
  w = reparam.effective_kernel(v, u, p)
  assert w.shape == v.shape
  assert float(pz.contraction_bound(w, bound)) <= 0.9
  if bound == 'spectral':
    assert float(abs_operator_bound(w)) <= 0.9
  # The same map as the projection of 'project' mode (sn: up to sigma's estimate).
  w_proj, _ = pz.project(v, u, p._replace(mode='project'))
  np.testing.assert_allclose(w, w_proj, rtol=1e-5 if method != 'sn' else 1e-4, atol=1e-8)


@pytest.mark.parametrize('bound', pz.BOUNDS)
@pytest.mark.parametrize('method', pz.METHODS)
def test_effective_kernel_gradient_matches_finite_differences(x64, method, bound):
  rng = np.random.default_rng(25)
  v = jnp.asarray(rng.standard_normal((3, 3, 4, 4)))
  u = pz.power_iteration(pz.flatten_kernel(v), jnp.ones(4) / 2, 100)[1]
  c = jnp.asarray(rng.standard_normal(v.shape))
  p = pz.Parametrization(method, 0.9, iters=30, mode='reparam', bound=bound)
  f = jax.jit(lambda v: jnp.sum(c * reparam.effective_kernel(v, u, p)))
  grad = np.asarray(jax.grad(f)(v))
  assert np.abs(grad).max() > 1e-3
  for seed in range(2):
    d = np.random.default_rng(seed).standard_normal(v.shape)
    h = 1e-6
    fd = (float(f(v + h * d)) - float(f(v - h * d))) / (2 * h)
    # rho: the power iteration's 1e-6 shift makes v the Perron vector only to ~1e-6.
    np.testing.assert_allclose(np.vdot(grad, d), fd, rtol=1e-6 if bound == 'spectral' else 1e-4)


@pytest.mark.parametrize('method', pz.METHODS)
def test_project_tree_reparam_leaves_free_parameter_alone(method):
  v = _normal(26, (3, 3, 16, 16))
  params = {'deq': {pz.HIDDEN_FREE: v, 'injection': {'kernel': _normal(27, (3, 3, 3, 16))}}}
  u = pz.initial_spectral_vector(jax.random.PRNGKey(1), v)
  states = {'deq': {pz.HIDDEN_FREE: u}} if method == 'sn' else {}
  p = pz.Parametrization(method, 0.9, mode='reparam')
  new_params, new_states = pz.project_tree(params, states, p)
  np.testing.assert_array_equal(new_params['deq'][pz.HIDDEN_FREE], v)
  np.testing.assert_array_equal(new_params['deq']['injection']['kernel'],
                                params['deq']['injection']['kernel'])
  if method != 'sn':
    assert new_states == {}
    return
  # SN: the persisted vector advances towards the top right singular vector.
  u_new = np.asarray(new_states['deq'][pz.HIDDEN_FREE])
  top = np.linalg.svd(np.asarray(v, np.float64).reshape(-1, 16))[2][0]
  np.testing.assert_allclose(np.linalg.norm(u_new), 1.0, rtol=1e-5)
  assert abs(u_new @ top) > abs(np.asarray(u) @ top)


def test_method_names_and_validation():
  assert pz.as_parametrization('sn') == pz.Parametrization('sn')
  assert pz.Parametrization('wn', mode='reparam').param_name == pz.HIDDEN_FREE
  assert pz.Parametrization('wn').param_name == pz.HIDDEN_KERNEL
  for bad in (dict(mode='both'), dict(bound='frobenius'), dict(method='orthogonal')):
    with pytest.raises(ValueError, match=next(iter(bad.values()))):
      pz.as_parametrization(pz.Parametrization(**bad))
  k = _normal(28, (3, 3, 4, 4))
  w, _ = pz.project_tree({'hidden_kernel': k}, None, 'wn')
  assert float(abs_operator_bound(w['hidden_kernel'])) <= 0.95


# --- initialisers -------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(3, 3, 64, 256), (1024, 512)])
def test_initialiser_std(shape):
  n = math.prod(shape[:-1])
  key = jax.random.PRNGKey(9)
  cer = np.asarray(pz.cerdeq_injection_init()(key, shape, jnp.float32))
  np.testing.assert_allclose(cer.std(), math.sqrt(math.pi) / (math.sqrt(2) * n), rtol=0.03)
  np.testing.assert_allclose(n * np.abs(cer).mean(), 1.0, rtol=0.03)  # n_u E|U| = 1
  ibp = np.asarray(pz.fast_ibp_init()(key, shape, jnp.float32))
  np.testing.assert_allclose(ibp.std(), math.sqrt(2 * math.pi) / n, rtol=0.03)
  res = np.asarray(pz.fast_ibp_init(residual=True)(key, shape, jnp.float32))
  np.testing.assert_allclose(res.std(), 0.5 * math.sqrt(2 * math.pi) / n, rtol=0.03)
  assert pz.fast_ibp_init()(key, shape, jnp.bfloat16).dtype == jnp.bfloat16


def test_singular_values():
  m = np.random.default_rng(10).standard_normal((3, 3, 4, 6)).astype(np.float32)
  np.testing.assert_allclose(pz.singular_values(m),
                             np.linalg.svd(m.reshape(36, 6), compute_uv=False), rtol=1e-5)


# --- independent check of abs_operator_bound ---------------------------------------

def _abs_conv_matrix(kernel, height, width, circular=False):
  """Dense matrix (HWC x HWC) of the convolution with |kernel|, column by column."""
  k = np.abs(np.asarray(kernel, np.float32))
  c = k.shape[2]
  n = height * width * c
  basis = np.eye(n, dtype=np.float32).reshape(n, height, width, c)
  if circular:
    p = k.shape[0] // 2
    padded = np.pad(basis, ((0, 0), (p, p), (p, p), (0, 0)), mode='wrap')
    out = ops.conv(jnp.asarray(padded), jnp.asarray(k), padding='VALID')
  else:
    out = ops.conv(jnp.asarray(basis), jnp.asarray(k), padding='SAME')
  return np.asarray(out, np.float64).reshape(n, -1).T  # column j = image of e_j


@pytest.mark.parametrize('channels', [2, 3, 4])
def test_abs_operator_bound_is_upper_bound_for_zero_padding(channels):
  for seed in range(3):
    k = _normal(100 * seed + channels, (3, 3, channels, channels))
    for size in (5, 6):
      exact = np.linalg.norm(_abs_conv_matrix(k, size, size), 2)
      assert exact <= float(abs_operator_bound(k))


@pytest.mark.parametrize('channels', [2, 4])
def test_abs_operator_bound_is_tight_for_circular_padding(channels):
  k = _normal(channels, (3, 3, channels, channels))
  exact = np.linalg.norm(_abs_conv_matrix(k, 6, 6, circular=True), 2)
  np.testing.assert_allclose(float(abs_operator_bound(k)), exact, rtol=2e-4)


@pytest.mark.parametrize('shape', [(8, 8), (12, 5), (5, 12)])
def test_abs_operator_bound_dense_is_exact(shape):
  k = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
  ratio = float(abs_operator_bound(k)) / np.linalg.norm(np.abs(k).astype(np.float64), 2)
  assert 1.0 <= ratio <= 1.0 + 1.2e-4  # exact, times the documented 1e-4 safety factor
