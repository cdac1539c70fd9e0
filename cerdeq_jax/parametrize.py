"""Parametrisations of the DEQ hidden kernel W and the initialisers.

Three projections, applied to the parameters after every optimiser step,
keep the interval DEQ contractive, i.e. ``L(W) <= scale < 1`` where ``L`` is
`cerdeq_jax.deq.abs_operator_bound` (a rigorous bound on ``|| |W| ||_2``):

* ``'bjorck'`` (CerDEQ): nearest orthogonal flattened kernel, then scaled so
  that ``L(W) = scale``.
* ``'wn'`` (DEQ+WN): ``W = scale * V / (sqrt(k*k) * ||V||_F)``.
* ``'sn'`` (DEQ+SN): ``W = scale * V / sigma_max(V)`` by persisted power
  iteration, then clamped to ``L(W) <= scale`` *(ours)*.

A kernel is HWIO ``(k, k, C_in, C_out)`` or dense ``(D_in, D_out)``; it is
"flattened" to the matrix ``(k*k*C_in, C_out)`` (``(D_in, D_out)`` for dense).
Everything here is a pure, jit-able function of arrays (the array functions
are jitted themselves, with iteration counts static, so eager calls do not run
op by op); `Parametrization` is hashable, so it can be a static argument.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cerdeq_jax.deq import abs_operator_bound

HIGHEST = lax.Precision.HIGHEST
METHODS = ('bjorck', 'sn', 'wn')

# Rescaling by ``scale / L`` lands on ``scale`` only up to float32 rounding of L
# (an SVD, relative error ~1e-6); aim slightly lower so that the *computed*
# bound of the result is <= scale too.
_ROUNDING_MARGIN = 1.0 - 1e-5


class Parametrization(NamedTuple):
  """How the hidden kernel is kept contractive.

  method: 'bjorck' (CerDEQ), 'sn' (spectral norm) or 'wn' (weight norm).
  scale: target bound on ``|| |W| ||_2``, in (0, 1).
  iters: Björck iterations / power iterations per projection.
  """
  method: str = 'bjorck'
  scale: float = 0.95
  iters: int = 20


def validate(parametrization: Parametrization) -> Parametrization:
  """Raises ValueError on an unknown method, a scale outside (0, 1) or iters < 1."""
  if parametrization.method not in METHODS:
    raise ValueError(f'unknown parametrization method {parametrization.method!r}; '
                     f'expected one of {METHODS}')
  if not 0.0 < float(parametrization.scale) < 1.0:
    raise ValueError(f'scale must lie in (0, 1), got {parametrization.scale}')
  if int(parametrization.iters) < 1:
    raise ValueError(f'iters must be >= 1, got {parametrization.iters}')
  return parametrization


# --- flattening ---------------------------------------------------------------

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
    ``(m, n)`` in the input dtype. The input is pre-scaled by its Frobenius
    norm, so ``||A_0||_2 <= 1`` and the iteration converges for any full-rank
    input; singular values ``s`` grow by ~15/8 per step while ``s << 1``, so
    ill-conditioned inputs need more iterations.
  """
  if order < 1:
    raise ValueError(f'order must be >= 1, got {order}')
  dtype = matrix.dtype
  a = matrix.astype(jnp.float32)
  wide = a.shape[0] < a.shape[1]
  if wide:  # orthonormal rows of A == orthonormal columns of A^T
    a = a.T
  # Frobenius >= spectral: a safe pre-scaling without an SVD. `maximum` keeps
  # the zero matrix finite (it stays zero).
  a = a / jnp.maximum(jnp.linalg.norm(a), jnp.finfo(jnp.float32).tiny)
  q = _bjorck_tall(a, iters, order)
  return (q.T if wide else q).astype(dtype)


@functools.partial(jax.jit, static_argnames=('iters', 'order'))
def bjorck_kernel(kernel, iters: int = 20, order: int = 2) -> jax.Array:
  """`bjorck` of the flattened kernel ``(k*k*C_in, C_out)``, reshaped back."""
  return bjorck(flatten_kernel(kernel), iters, order).reshape(kernel.shape)


# --- projections -----------------------------------------------------------------

@jax.jit
def rescale_to_bound(kernel, scale) -> jax.Array:
  """``kernel * scale / L(kernel)`` so that ``L(result) <= scale`` (computed)."""
  return kernel * (scale * _ROUNDING_MARGIN / abs_operator_bound(kernel)).astype(kernel.dtype)


@jax.jit
def clamp_to_bound(kernel, scale) -> jax.Array:
  """Rescales only if ``L(kernel) > scale``; otherwise returns the kernel as is."""
  bound = abs_operator_bound(kernel)
  factor = jnp.where(bound > scale, scale * _ROUNDING_MARGIN / bound, 1.0)
  return kernel * factor.astype(kernel.dtype)


@functools.partial(jax.jit, static_argnames=('iters',))
def project_bjorck(kernel, scale: float = 0.95, iters: int = 20) -> jax.Array:
  """CerDEQ: ``W = scale * Q / L(Q)`` with Q = `bjorck_kernel` (kernel).

  Orthogonality of the flattened kernel alone does not bound the conv operator
  (brief §3), hence the division by the rigorous bound L: ``L(W) ≈ scale``
  (slightly below, see `_ROUNDING_MARGIN`).
  """
  return rescale_to_bound(bjorck_kernel(kernel, iters), scale)


@jax.jit
def project_weight_norm(kernel, scale: float = 0.95) -> jax.Array:
  """DEQ+WN: ``W = scale * V / (sqrt(k*k) * ||V||_F)`` (k*k = 1 for dense).

  Why it is enough: by Cauchy–Schwarz over the k*k taps,
  ``S[o,i]^2 = (sum_t |K[t,i,o]|)^2 <= k*k * sum_t K[t,i,o]^2``, so
  ``||S||_2 <= ||S||_F <= sqrt(k*k) * ||K||_F`` and ``|| |W| ||_2 <= ||S||_2 <= scale``.
  (The computed `abs_operator_bound` adds its 1e-4 SVD safety factor on top;
  equality needs a rank-one S with equal |taps|, so in practice it stays far
  below ``scale``.)
  """
  taps = math.prod(kernel.shape[:-2])
  norm = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32))))
  norm = jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
  return kernel * (scale / (math.sqrt(taps) * norm)).astype(kernel.dtype)


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
  matrix = jnp.asarray(matrix).astype(jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny

  def step(_, carry):
    _, u = carry
    v = jnp.matmul(matrix, u, precision=HIGHEST)
    v = v / jnp.maximum(jnp.linalg.norm(v), tiny)
    u = jnp.matmul(matrix.T, v, precision=HIGHEST)
    sigma = jnp.linalg.norm(u)
    return sigma, u / jnp.maximum(sigma, tiny)

  return lax.fori_loop(0, iters, step, (jnp.zeros((), jnp.float32), u.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=('iters',))
def spectral_normalize(kernel, u, scale: float = 0.95, iters: int = 1):
  """``W = scale * V / sigma`` with sigma from `power_iteration` on the
  flattened kernel. Returns ``(W, new_u, sigma)``; no contraction clamp."""
  # u is state, not a function of the weights (as in the usual SN).
  sigma, u = power_iteration(flatten_kernel(kernel), lax.stop_gradient(u), iters)
  sigma = jnp.maximum(sigma, jnp.finfo(jnp.float32).tiny)
  return kernel * (scale / sigma).astype(kernel.dtype), u, sigma


@functools.partial(jax.jit, static_argnames=('iters',))
def project_spectral_norm(kernel, u, scale: float = 0.95, iters: int = 20):
  """DEQ+SN: `spectral_normalize`, then if ``L(W) > scale``, ``W *= scale / L(W)``.

  The clamp is *(ours)*: a unit spectral norm of the flattened kernel does not
  bound ``|| |W| ||_2``, and without it the SN baseline's interval DEQ need
  not converge. Note ``||S||_2 >= ||flat(K)||_2`` always, so with the 1e-4
  safety factor in L the clamp (mildly, or strongly for mixed-sign conv
  kernels) fires whenever sigma has converged.

  Returns:
    ``(W, new_u)``; u, new_u: ``(C_out,)``.
  """
  w, u, _ = spectral_normalize(kernel, u, scale, iters)
  return clamp_to_bound(w, scale), u


def project(kernel, state, parametrization: Parametrization):
  """Projects one hidden kernel. Returns ``(kernel, state)``; state is the SN
  vector u ``(C_out,)`` for 'sn' (None -> a fixed start vector) and passes
  through unchanged otherwise."""
  method, scale, iters = validate(parametrization)
  if method == 'bjorck':
    return project_bjorck(kernel, scale, iters), state
  if method == 'wn':
    return project_weight_norm(kernel, scale), state
  if state is None:  # deterministic start; persist the returned u afterwards
    state = initial_spectral_vector(jax.random.PRNGKey(0), kernel)
  return project_spectral_norm(kernel, state, scale, iters)


def _is_leaf(x) -> bool:
  return not isinstance(x, Mapping)


def project_tree(params, states, parametrization: Parametrization,
                 name: str = 'hidden_kernel'):
  """Applies `project` to every leaf of a (nested dict) params tree whose key
  is ``name``; all other leaves are returned untouched.

  Args:
    params: nested Mapping of arrays (e.g. Flax ``params``).
    states: nested Mapping with the same nesting holding the SN vector (or
      None) under each ``name`` key, e.g. from `init_spectral_states`; None
      (anywhere) means "no state".

  Returns:
    ``(params, states)`` with the same container types.
  """
  validate(parametrization)

  def walk(p, s):
    new_p, new_s = {}, {}
    for key, value in p.items():
      sub = s.get(key) if isinstance(s, Mapping) else None
      if key == name and _is_leaf(value):
        new_p[key], state = project(value, sub, parametrization)
        if state is not None:  # stateless methods leave the states tree empty
          new_s[key] = state
      elif not _is_leaf(value):
        new_p[key], child = walk(value, sub)
        if child:
          new_s[key] = child
      else:
        new_p[key] = value
    return type(p)(new_p), new_s

  new_params, new_states = walk(params, states)
  if isinstance(states, Mapping):
    new_states = type(states)(new_states)
  return new_params, new_states


def init_spectral_states(key, params, name: str = 'hidden_kernel'):
  """A states tree for `project_tree`: a random unit u ``(C_out,)`` under
  every ``name`` key of ``params`` (nested dict), nothing elsewhere."""
  counter = iter(range(1 << 30))

  def walk(p):
    out = {}
    for k, value in p.items():
      if k == name and _is_leaf(value):
        out[k] = initial_spectral_vector(jax.random.fold_in(key, next(counter)), value)
      elif not _is_leaf(value):
        child = walk(value)
        if child:
          out[k] = child
    return out

  return walk(params)


# --- initialisers --------------------------------------------------------------

Initializer = Callable[..., jax.Array]


def fan_in(shape) -> int:
  """``prod(shape[:-1])``: k*k*C_in for HWIO, D_in for a dense kernel."""
  return math.prod(shape[:-1])


def _normal_init(std_fn: Callable[[int], float]) -> Initializer:
  def init(key, shape, dtype: Any = jnp.float32):
    std = std_fn(fan_in(shape))
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


def cerdeq_injection_init() -> Initializer:
  """CerDEQ injection U ~ N(0, sigma^2), ``sigma = sqrt(pi) / (sqrt(2) * n_u)``,
  n_u = fan_in, so that ``n_u * E|U| = n_u * sigma * sqrt(2/pi) = 1`` (brief §4)."""
  return _normal_init(lambda n: math.sqrt(math.pi) / (math.sqrt(2.0) * n))


def fast_ibp_init(residual: bool = False) -> Initializer:
  """Fast-IBP init: N(0, sigma^2), ``sigma = sqrt(2*pi) / fan_in``, halved for
  weights after a residual add (brief §6)."""
  factor = 0.5 if residual else 1.0
  return _normal_init(lambda n: factor * math.sqrt(2.0 * math.pi) / n)
