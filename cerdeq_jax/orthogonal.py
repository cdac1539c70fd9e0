"""Matrix primitives on flattened kernels: Björck orthogonalisation and power
iteration (used by `cerdeq_jax.parametrize` and `cerdeq_jax.reparam`).

A kernel is HWIO ``(k, k, C_in, C_out)`` or dense ``(D_in, D_out)``; it is
"flattened" to the matrix ``(k*k*C_in, C_out)`` (``(D_in, D_out)`` for dense).
Computations run in at least float32 (float64 stays float64). Everything is a
pure, jit-able function of arrays, jitted with iteration counts static, and
differentiable (the loops have static trip counts).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


# --- flattening ---------------------------------------------------------------

def at_least_f32(x) -> jax.Array:
  """float32, or float64 for float64 input (gradient checks in x64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def flatten_kernel(kernel) -> jax.Array:
  """HWIO ``(k, k, C_in, C_out)`` -> ``(k*k*C_in, C_out)``; dense unchanged."""
  return jnp.reshape(kernel, (-1, kernel.shape[-1]))


@jax.jit
def singular_values(kernel) -> jax.Array:
  """Singular values ``(min(k*k*C_in, C_out),)`` of the flattened kernel, descending."""
  return jnp.linalg.svd(flatten_kernel(jnp.asarray(kernel, jnp.float32)), compute_uv=False)


# --- Björck orthogonalisation --------------------------------------------------

def _inv_sqrt_coefficients(order: int) -> list[float]:
  """Taylor coefficients of ``(1 - q)^(-1/2)`` up to ``q^order``: 1, 1/2, 3/8, ..."""
  return [math.comb(2 * p, p) / 4.0**p for p in range(order + 1)]


def _bjorck_tall(a, iters: int, order: int):
  """Björck on a tall ``(m, n)``, m >= n, already scaled to ``||a||_2 <= 1``.

  ``A <- A (I + 1/2 Q + 3/8 Q^2 + ...)`` with ``Q = I - A^T A``: the truncated
  series of ``(A^T A)^(-1/2)``. For order 2 this is exactly
  ``15/8 A - 5/4 A (A^T A) + 3/8 A (A^T A)^2``.
  """
  n = a.shape[1]
  eye = jnp.eye(n, dtype=a.dtype)
  coeffs = _inv_sqrt_coefficients(order)

  def step(_, a):
    q = eye - jnp.matmul(a.T, a, precision=HIGHEST)  # (n, n): the small Gram
    poly = coeffs[-1] * eye
    for c in reversed(coeffs[:-1]):  # Horner in Q
      poly = c * eye + jnp.matmul(q, poly, precision=HIGHEST)
    return jnp.matmul(a, poly, precision=HIGHEST)

  return lax.fori_loop(0, iters, step, a)


@functools.partial(jax.jit, static_argnames=('iters', 'order'))
def bjorck(matrix, iters: int = 20, order: int = 2) -> jax.Array:
  """Nearest orthogonal matrix (the polar factor ``U V^T``) by Björck iterations.

  Args:
    matrix: ``(m, n)``. Tall (m >= n) gives orthonormal columns, wide gives
      orthonormal rows; the iteration runs on the ``min(m, n)`` Gram.
    iters: number of iterations (static).
    order: truncation order of the ``(A^T A)^(-1/2)`` series (brief: 2).

  Returns:
    ``(m, n)`` in the input dtype (computed in at least float32). The input is
    pre-scaled by its Frobenius
    norm, so ``||A_0||_2 <= 1`` and the iteration converges for any full-rank
    input; singular values ``s`` grow by ~15/8 per step while ``s << 1``, so
    ill-conditioned inputs need more iterations.
  """
  if order < 1:
    raise ValueError(f'order must be >= 1, got {order}')
  dtype = matrix.dtype
  a = at_least_f32(matrix)
  wide = a.shape[0] < a.shape[1]
  if wide:  # orthonormal rows of A == orthonormal columns of A^T
    a = a.T
  # Frobenius >= spectral: a safe pre-scaling without an SVD. `maximum` keeps
  # the zero matrix finite (it stays zero).
  a = a / jnp.maximum(jnp.linalg.norm(a), jnp.finfo(a.dtype).tiny)
  q = _bjorck_tall(a, iters, order)
  return (q.T if wide else q).astype(dtype)


@functools.partial(jax.jit, static_argnames=('iters', 'order'))
def bjorck_kernel(kernel, iters: int = 20, order: int = 2) -> jax.Array:
  """`bjorck` of the flattened kernel ``(k*k*C_in, C_out)``, reshaped back."""
  return bjorck(flatten_kernel(kernel), iters, order).reshape(kernel.shape)


def initial_spectral_vector(key, kernel) -> jax.Array:
  """Random unit vector ``(C_out,)`` to start the persisted power iteration."""
  u = jax.random.normal(key, (kernel.shape[-1],), jnp.float32)
  return u / jnp.linalg.norm(u)


@functools.partial(jax.jit, static_argnames=('iters',))
def power_iteration(matrix, u, iters: int = 1):
  """``iters`` power iterations on ``matrix^T matrix`` from ``u``.

  Args:
    matrix: ``(m, n)``; u: ``(n,)``, the previous right singular vector.

  Returns:
    ``(sigma, u)``: ``sigma = ||matrix^T v||``, a lower bound on ``sigma_max``
    converging to it, and the new unit ``u`` ``(n,)``.
  """
  if iters < 1:
    raise ValueError(f'iters must be >= 1, got {iters}')
  matrix = at_least_f32(matrix)
  tiny = jnp.finfo(matrix.dtype).tiny

  def step(_, carry):
    _, u = carry
    v = jnp.matmul(matrix, u, precision=HIGHEST)
    v = v / jnp.maximum(jnp.linalg.norm(v), tiny)
    u = jnp.matmul(matrix.T, v, precision=HIGHEST)
    sigma = jnp.linalg.norm(u)
    return sigma, u / jnp.maximum(sigma, tiny)

  return lax.fori_loop(0, iters, step, (jnp.zeros((), matrix.dtype), u.astype(matrix.dtype)))
