"""Implicit gradients of `fixed_point` against (a) central finite differences and
(b) backpropagation through a long fixed-length unrolled iteration, in float64,
for an array state and a pytree state; under jit and vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

from cerdeq_jax.implicit import fixed_point
from cerdeq_jax.solvers import Anderson, Picard

try:
  from tests import conftest as H
except ImportError:  # pragma: no cover
  import conftest as H

pytestmark = pytest.mark.usefixtures('x64')

# Picard compiles faster than Anderson; Anderson is checked against it below.
TIGHT = Picard(tol=1e-13, max_iter=500)
TIGHT_ANDERSON = Anderson(tol=1e-13, max_iter=300)
UNROLL = 200


def _scaled(rng, shape, norm):
  m = rng.normal(size=shape)
  return jnp.asarray(m * norm / np.linalg.norm(m, 2))


# --- problem 1: array state z -> tanh(W z + U x + b) ---

def dense_fn(theta, z):
  return jnp.tanh(theta['W'] @ z + theta['U'] @ theta['x'] + theta['b'])


def dense_theta(seed=0):
  rng = np.random.default_rng(seed)
  return {'W': _scaled(rng, (5, 5), 0.6), 'U': jnp.asarray(rng.normal(size=(5, 3))),
          'x': jnp.asarray(rng.normal(size=3)), 'b': jnp.asarray(rng.normal(size=5))}


def dense_z0(theta):
  return jnp.zeros(5)


def dense_loss_of_z(z):
  c = jnp.linspace(-1.0, 2.0, 5)
  return jnp.sum(c * z) + 0.5 * jnp.sum(z ** 3)


# --- problem 2: pytree state {'p': (3,), 'q': (2, 2)} ---

def tree_fn(theta, z):
  p, q = z['p'], z['q']
  p_new = jnp.tanh(theta['A'] @ p + theta['B'] @ q.ravel() + theta['x'])
  q_new = 0.5 * jnp.sin(theta['M'] @ q + (theta['C'] @ p)[:, None] + theta['y'])
  return {'p': p_new, 'q': q_new}


def tree_theta(seed=1):
  rng = np.random.default_rng(seed)
  return {'A': _scaled(rng, (3, 3), 0.4), 'B': _scaled(rng, (3, 4), 0.3),
          'M': _scaled(rng, (2, 2), 0.5), 'C': _scaled(rng, (2, 3), 0.5),
          'x': jnp.asarray(rng.normal(size=3)), 'y': jnp.asarray(rng.normal(size=(2, 2)))}


def tree_z0(theta):
  return {'p': jnp.zeros(3), 'q': jnp.zeros((2, 2))}


def tree_loss_of_z(z):
  return jnp.sum(jnp.sin(z['p']) * jnp.arange(1.0, 4.0)) + jnp.sum(z['q'] ** 2)


PROBLEMS = {
    'dense': (dense_fn, dense_theta, dense_z0, dense_loss_of_z),
    'tree': (tree_fn, tree_theta, tree_z0, tree_loss_of_z),
}


def _losses(problem, solver=TIGHT, adjoint_solver=None):
  fn, make_theta, make_z0, loss_of_z = PROBLEMS[problem]

  def implicit_loss(theta):
    z, _ = fixed_point(fn, theta, make_z0(theta), solver, adjoint_solver)
    return loss_of_z(z)

  def unrolled_loss(theta):
    z = lax.fori_loop(0, UNROLL, lambda _, z: fn(theta, z), make_z0(theta))
    return loss_of_z(z)

  return make_theta(), implicit_loss, unrolled_loss


@pytest.mark.parametrize('problem', ['dense', 'tree'])
def test_gradient_matches_finite_differences_and_unrolled(problem):
  theta, implicit_loss, unrolled_loss = _losses(problem)
  grad = H.jit(jax.grad(implicit_loss))(theta)
  # (b) unrolled backprop (0.6^200 ~ 1e-44: the unrolled iteration is converged).
  grad_unrolled = H.jit(jax.grad(unrolled_loss))(theta)
  for k in theta:
    np.testing.assert_allclose(grad[k], grad_unrolled[k], rtol=1e-9, atol=1e-11, err_msg=k)
  # (a) central finite differences on every parameter.
  flat, unravel = ravel_pytree(theta)
  loss_flat = H.jit(lambda v: implicit_loss(unravel(v)))
  # Loss values agree too.
  np.testing.assert_allclose(loss_flat(flat), H.jit(unrolled_loss)(theta), rtol=1e-12)
  h = 1e-5
  eye = np.eye(flat.size)
  fd = np.array([(loss_flat(flat + h * e) - loss_flat(flat - h * e)) / (2 * h) for e in eye])
  g_flat, _ = ravel_pytree(grad)
  np.testing.assert_allclose(g_flat, fd, rtol=1e-6, atol=1e-7)
  assert np.max(np.abs(fd)) > 1e-2  # a non-trivial gradient


def test_gradient_independent_of_solver():
  """Anderson forward and adjoint solves give the Picard gradient (pytree state)."""
  theta, picard_loss, _ = _losses('tree')
  _, anderson_loss, _ = _losses('tree', TIGHT_ANDERSON)
  g_picard, g_anderson = H.jit(
      lambda t: (jax.grad(picard_loss)(t), jax.grad(anderson_loss)(t)))(theta)
  for k in theta:
    np.testing.assert_allclose(g_anderson[k], g_picard[k], rtol=1e-9, atol=1e-11)


def test_gradient_wrt_initial_state_is_zero_and_solution_does_not_depend_on_it():
  theta = dense_theta()
  loss = lambda z0: dense_loss_of_z(fixed_point(dense_fn, theta, z0, TIGHT)[0])
  z0 = jnp.asarray(np.random.default_rng(3).normal(size=5))
  value_and_grad = H.jit(jax.value_and_grad(loss))
  value, grad = value_and_grad(z0)
  np.testing.assert_array_equal(grad, np.zeros(5))
  np.testing.assert_allclose(value, value_and_grad(jnp.zeros(5))[0], rtol=1e-12)


def test_vmap_and_jit_of_gradients():
  theta = dense_theta()
  xs = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3)))

  def loss(x, theta):
    z, _ = fixed_point(dense_fn, dict(theta, x=x), jnp.zeros(5), TIGHT)
    return dense_loss_of_z(z)

  def loss_unrolled(x, theta):
    th = dict(theta, x=x)
    z = lax.fori_loop(0, UNROLL, lambda _, z: dense_fn(th, z), jnp.zeros(5))
    return dense_loss_of_z(z)

  batch_loss = lambda theta: jnp.sum(jax.vmap(loss, in_axes=(0, None))(xs, theta))

  @H.jit
  def everything(xs, theta):
    per_sample = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))(xs, theta)
    reference = jax.vmap(jax.grad(loss_unrolled, argnums=(0, 1)), in_axes=(0, None))(xs, theta)
    batch = jax.grad(batch_loss)(theta)
    _, st = jax.vmap(lambda x: fixed_point(dense_fn, dict(theta, x=x), jnp.zeros(5), TIGHT))(xs)
    return per_sample, reference, batch, st

  (gx, gth), (gx_ref, gth_ref), g, st = everything(xs, theta)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(gth['W'], gth_ref['W'], rtol=1e-9, atol=1e-11)
  assert not np.allclose(gx[0], gx[1])
  # Gradient of a batch loss: the sum of the per-sample gradients.
  np.testing.assert_allclose(g['W'], np.sum(gth['W'], 0), rtol=1e-9, atol=1e-11)
  # The solver statistics come out per sample.
  assert st.iterations.shape == (4,) and bool(jnp.all(st.converged))
