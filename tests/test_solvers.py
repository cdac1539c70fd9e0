"""Fixed-point solvers against independent computations (float64).

Problems: ``z -> tanh(A z + b)`` with ``||A||_2 = L < 1`` on an array and on a
dict of two arrays (one coupled operator), so the exact fixed point is known
to any precision by a long numpy Picard iteration, and any point ``r`` obeys
``||r - z*|| <= ||f(r) - r|| / (1 - L)``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import solvers
from cerdeq_jax.solvers import Anderson, Picard, solve

try:
  from tests import conftest as H
except ImportError:  # pragma: no cover
  import conftest as H

pytestmark = pytest.mark.usefixtures('x64')


def _contraction(seed, n, lipschitz):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return lipschitz * q, rng.normal(size=n)


def _dense_problem(seed=0, n=12, lipschitz=0.8):
  a, b = _contraction(seed, n, lipschitz)
  f = lambda z: jnp.tanh(a @ z + b)
  f_np = lambda z: np.tanh(a @ z + b)
  return f, f_np, np.zeros(n), (lambda z: np.asarray(z)), (lambda v: jnp.asarray(v))


def _tree_problem(seed=1, lipschitz=0.8):
  """State {'u': (4,), 'v': (2, 3)}: one 10x10 contraction split in blocks."""
  a, b = _contraction(seed, 10, lipschitz)

  def flat(tree):
    return np.concatenate([np.asarray(tree['u']).ravel(), np.asarray(tree['v']).ravel()])

  def unflat(v):
    return {'u': jnp.asarray(v[:4]), 'v': jnp.asarray(v[4:]).reshape(2, 3)}

  def f(tree):
    z = jnp.concatenate([tree['u'], tree['v'].ravel()])
    h = jnp.tanh(a @ z + b)
    return {'u': h[:4], 'v': h[4:].reshape(2, 3)}

  f_np = lambda z: np.tanh(a @ z + b)
  return f, f_np, np.zeros(10), flat, unflat


PROBLEMS = {'dense': _dense_problem, 'tree': _tree_problem}


def _exact(f_np, z0, steps=3000):
  z = z0
  for _ in range(steps):
    z = f_np(z)
  return z


def _reference_picard(f_np, z0, tol, max_iter, damping=1.0):
  """The documented stopping rule, unrolled in Python (numpy, no JAX)."""
  calls = 1
  z, fz = z0, f_np(z0)
  rel = lambda z, fz: np.linalg.norm(fz - z) / (np.linalg.norm(fz) + 1e-8)
  it = 0
  while not (rel(z, fz) <= tol or it >= max_iter):
    z = (1 - damping) * z + damping * fz
    fz = f_np(z)
    calls += 1
    it += 1
  return fz, it, rel(z, fz), np.linalg.norm(fz - z), calls


def _solve(f, z0, solver):
  """`solve` under a (fast-compiling) jit."""
  return H.jit(lambda z: solve(f, z, solver))(z0)


SOLVERS = {
    'picard': Picard(tol=1e-9, max_iter=500),
    'anderson': Anderson(tol=1e-9, max_iter=500),
}


@pytest.mark.parametrize('problem', ['dense', 'tree'])
@pytest.mark.parametrize('name', ['picard', 'anderson'])
def test_solution_meets_tolerance_and_is_near_exact(problem, name):
  f, f_np, z0, flat, unflat = PROBLEMS[problem]()
  solver = SOLVERS[name]
  r, st = H.jit(lambda z: solve(f, z, solver))(unflat(z0))
  assert bool(st.converged) and float(st.residual) <= solver.tol
  rv = flat(r)
  assert rv.dtype == np.float64
  res = np.linalg.norm(f_np(rv) - rv)
  assert res <= solver.tol * np.linalg.norm(f_np(rv))
  exact = _exact(f_np, z0)
  # r = f(z_k): ||r - z*|| <= L/(1-L) ||f(z_k) - z_k||  with L = 0.8.
  assert np.linalg.norm(rv - exact) <= 4.0 * float(st.abs_residual) * (1 + 1e-6) + 1e-14
  assert np.linalg.norm(rv - exact) <= 4.0 * solver.tol * np.linalg.norm(exact) * 1.01
  # The reported residuals are consistent with each other.
  np.testing.assert_allclose(float(st.residual),
                             float(st.abs_residual) / (np.linalg.norm(rv) + 1e-8), rtol=1e-9)


@pytest.mark.parametrize('problem, damping, tol, max_iter', [
    ('dense', 1.0, 1e-9, 500), ('tree', 0.5, 1e-9, 500), ('tree', 1.0, 1e-12, 7),
    ('dense', 0.7, 1e-6, 500)])
def test_picard_matches_python_reference(problem, damping, tol, max_iter):
  f, f_np, z0, flat, unflat = PROBLEMS[problem]()
  r, st = _solve(f, unflat(z0), Picard(tol=tol, max_iter=max_iter, damping=damping))
  ref, it, rel, abs_res, _ = _reference_picard(f_np, z0, tol, max_iter, damping)
  assert int(st.iterations) == it
  assert bool(st.converged) == (rel <= tol)
  np.testing.assert_allclose(flat(r), ref, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(float(st.residual), rel, rtol=1e-6, atol=1e-15)
  np.testing.assert_allclose(float(st.abs_residual), abs_res, rtol=1e-6, atol=1e-15)


def _counting(f):
  """Wraps ``f`` so that every *executed* call bumps a host-side counter."""
  calls = []

  def wrapped(z):
    jax.debug.callback(lambda: calls.append(1))
    return f(z)

  return wrapped, calls


@pytest.mark.parametrize('solver', [
    Picard(tol=1e-9, max_iter=500), Picard(tol=1e-9, max_iter=5),
    Anderson(tol=1e-9, max_iter=500), Anderson(tol=1e-9, max_iter=4, memory=3)],
    ids=['picard', 'picard-capped', 'anderson', 'anderson-capped'])
def test_iterations_equal_calls_minus_one(solver):
  f, f_np, z0, flat, unflat = PROBLEMS['tree']()
  g, calls = _counting(f)
  _, st = _solve(g, unflat(z0), solver)
  jax.effects_barrier()
  assert int(st.iterations) == len(calls) - 1
  capped = solver.max_iter < 10
  assert int(st.iterations) == (solver.max_iter if capped else int(st.iterations))
  assert bool(st.converged) == (not capped)
  if capped:
    assert float(st.residual) > solver.tol
  if isinstance(solver, Picard):
    assert len(calls) == _reference_picard(f_np, z0, solver.tol, solver.max_iter)[-1]


def test_picard_and_anderson_agree():
  f, f_np, z0, flat, unflat = PROBLEMS['dense']()
  tol, lipschitz = 1e-10, 0.8
  p, sp = _solve(f, unflat(z0), Picard(tol=tol, max_iter=1000))
  a, sa = _solve(f, unflat(z0), Anderson(tol=tol, max_iter=1000))
  assert bool(sp.converged) and bool(sa.converged)
  bound = 2 * tol / (1 - lipschitz) * np.linalg.norm(flat(p))
  assert np.linalg.norm(flat(p) - flat(a)) <= bound


def test_anderson_needs_fewer_iterations_on_slow_contraction():
  # tanh(A z + b) with A symmetric, spectrum in [0, 0.95], and a small b: nearly
  # linear and slowly contracting. (A spectrum spread on a circle, e.g. 0.95 * an
  # orthogonal matrix, is the worst case of every Krylov-type method, Anderson
  # included: avoid it.)
  q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(20, 20)))
  a = q @ np.diag(np.linspace(0.5, 0.95, 20)) @ q.T
  b = np.random.default_rng(4).normal(size=20)
  f = lambda z: jnp.tanh(a @ z + 0.01 * b)
  z0 = jnp.zeros(20)
  p, sp = _solve(f, z0, Picard(tol=1e-8, max_iter=2000))
  an, sa = _solve(f, z0, Anderson(tol=1e-8, max_iter=2000, memory=5))
  assert bool(sp.converged) and bool(sa.converged)
  assert int(sp.iterations) > 100  # the problem is slow for Picard...
  assert int(sa.iterations) * 3 < int(sp.iterations)  # ...and not for Anderson
  np.testing.assert_allclose(an, p, atol=2e-8 / 0.05 * float(jnp.linalg.norm(p)))


def test_damping_makes_an_expansive_linear_map_converge():
  # f(z) = -1.5 z + b is not a contraction; z <- 0.5 z + 0.5 f(z) = -0.25 z + 0.5 b is,
  # with fixed point b / 2.5.
  b = jnp.asarray(np.random.default_rng(4).normal(size=6))
  f = lambda z: -1.5 * z + b
  _, st = _solve(f, jnp.zeros(6), Picard(tol=1e-10, max_iter=60))
  assert not bool(st.converged)
  r, st = _solve(f, jnp.zeros(6), Picard(tol=1e-10, max_iter=60, damping=0.5))
  assert bool(st.converged)
  np.testing.assert_allclose(r, b / 2.5, rtol=1e-9)
  r, st = _solve(f, jnp.zeros(6), Anderson(tol=1e-10, max_iter=60))
  assert bool(st.converged)
  np.testing.assert_allclose(r, b / 2.5, rtol=1e-8)


@H.jit
def _degenerate_solves(a, c, z0):
  """Anderson on f(z) = a * z + c (a, c traced: one compilation per dtype):
  with tol < 0 (never converges, so the memory fills with zero residuals) and
  with a normal tol."""
  f = lambda z: a * z + c
  return (solve(f, z0, Anderson(tol=-1.0, max_iter=12, memory=4)),
          solve(f, z0, Anderson(tol=1e-6, max_iter=12, memory=4)))


@pytest.mark.parametrize('case', ['constant', 'identity', 'zero', 'already-solved'])
@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_anderson_safeguard_no_nan_on_degenerate_problems(case, dtype):
  c = jnp.asarray(np.linspace(-1, 1, 5), dtype)
  zeros = jnp.zeros(5, dtype)
  a, shift, z0 = {
      'constant': (0.0, c, zeros),        # residuals exactly 0 after one step
      'identity': (1.0, zeros, c),        # every iterate repeats exactly, zero residual
      'zero': (0.0, zeros, zeros),        # zero state, zero residuals, zero norms
      'already-solved': (0.0, c, c),
  }[case]
  (r, st), (r_tol, st_tol) = _degenerate_solves(jnp.asarray(a, dtype), shift, z0)
  expected = c if case != 'zero' else zeros
  assert int(st.iterations) == 12
  assert np.all(np.isfinite(np.asarray(r)))
  assert np.isfinite(float(st.residual)) and np.isfinite(float(st.abs_residual))
  np.testing.assert_allclose(r, expected, atol=1e-6)
  # With a normal tolerance it stops as soon as the residual is zero.
  assert bool(st_tol.converged) and int(st_tol.iterations) <= 1
  np.testing.assert_allclose(r_tol, expected, atol=1e-6)


def test_anderson_falls_back_to_picard_when_the_gram_system_is_not_finite():
  # float32 residuals of size 1e20: their Gram matrix overflows to inf, the mixing
  # weights are NaN, and the documented fallback (a Picard step) must take over.
  # f(z) = 0.5 z + c has the fixed point 2c; Picard halves the error per step.
  c = jnp.asarray(np.linspace(1, 2, 5) * 1e20, jnp.float32)
  r, st = H.jit(lambda z: solve(lambda z: 0.5 * z + c, z, Anderson(tol=-1.0, max_iter=40)))(
      jnp.zeros(5, jnp.float32))
  assert int(st.iterations) == 40
  assert np.all(np.isfinite(np.asarray(r)))
  np.testing.assert_allclose(r, 2 * c, rtol=1e-5)


@pytest.mark.parametrize('solver', [Anderson(tol=1e-10, max_iter=300, memory=3),
                                    Picard(tol=1e-10, max_iter=300)], ids=['anderson', 'picard'])
@pytest.mark.parametrize('how', ['vmap', 'batched'])
def test_batches_stop_per_sample_and_equal_single_solves(solver, how):
  # A tree state {'u': (N, 3), 'v': (N, 5)}: with `batched`, the batch shares
  # the history's ring slot, yet each sample must get its single solve.
  a, _ = _contraction(5, 8, 0.9)
  bs = jnp.asarray(np.random.default_rng(6).normal(size=(4, 8))
                   * np.array([[0.01], [1], [3], [0.3]]))
  split = lambda z: {'u': z[..., :3], 'v': z[..., 3:]}
  cell = lambda z, b: split(jnp.tanh(jnp.concatenate([z['u'], z['v']], -1) @ a.T + b))
  z0 = split(jnp.zeros((4, 8)))
  if how == 'vmap':
    r, st = H.jit(jax.vmap(lambda z, b: solve(lambda y: cell(y, b), z, solver)))(z0, bs)
  else:
    r, st = H.jit(lambda z: solve(lambda y: cell(y, bs), z, solver, batched=True))(z0)
  assert st.iterations.shape == (4,) and st.converged.shape == (4,)
  solve_one = H.jit(lambda z, b: solve(lambda y: cell(y, b), z, solver))
  for i in range(4):
    ri, si = solve_one(jax.tree_util.tree_map(lambda x: x[i], z0), bs[i])
    assert int(st.iterations[i]) == int(si.iterations) and bool(si.converged)
    for key in ('u', 'v'):
      np.testing.assert_allclose(r[key][i], ri[key], rtol=1e-9, atol=1e-12)
  assert len(set(np.asarray(st.iterations).tolist())) > 1  # stopping is per sample


def test_solver_state_dtype_is_preserved():
  f, _, z0, flat, unflat = PROBLEMS['tree']()
  z32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), unflat(z0))
  f32 = lambda z: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), f(z))
  r, st = _solve(f32, z32, Anderson(tol=1e-5))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(r))
  assert bool(st.converged)
  assert solvers.SolverStats._fields == ('iterations', 'residual', 'abs_residual', 'converged')


EXPLICIT_SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from cerdeq_jax import solvers
rng = np.random.RandomState(0)
a = jnp.asarray(rng.randn(5, 5) * 0.2, jnp.float32)
b = jnp.asarray(rng.randn(4, 5), jnp.float32)
mesh = jax.make_mesh((2,), ('d',), axis_types=(AxisType.Explicit,))
out = {}
for solver in (solvers.Anderson(tol=1e-6), solvers.Picard(tol=1e-6)):
  lone, _ = solvers.solve(lambda z: jnp.tanh(z @ a + b), jnp.zeros_like(b), solver, batched=True)
  with jax.set_mesh(mesh):
    bs = jax.device_put(b, NamedSharding(mesh, P('d')))
    z, _ = jax.jit(lambda z0: solvers.solve(lambda z: jnp.tanh(z @ a + bs), z0, solver,
                                            batched=True))(jnp.zeros_like(bs))
  out[type(solver).__name__] = [float(jnp.max(jnp.abs(z - lone))), str(z.sharding.spec[0])]
print(json.dumps(out))
'''


def test_batched_solve_under_explicit_sharding():
  """Each solver, called directly on a batch sharded over explicit mesh axes
  (its histories and counters laid out like the batch), gives the
  one-device fixed point and keeps the batch's layout."""
  from tests import helpers_training
  out = helpers_training.run_on_devices(EXPLICIT_SCRIPT, devices=2)
  for name, (error, spec) in out.items():
    assert error < 1e-5 and spec == 'd', name
