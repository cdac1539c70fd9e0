"""Parametrisations of the DEQ hidden kernel W.

Three ways to keep the interval DEQ contractive, i.e. ``b(W) <= scale < 1``
for the bound ``b`` chosen by ``Parametrization.bound``: ``'spectral'``,
``L = ||S||_2`` (`cerdeq_jax.deq.abs_operator_bound`, a rigorous bound on
``|| |W| ||_2``), or ``'rho'``, the Collatz–Wielandt bound ``rho >= rho(S)``
(`cerdeq_jax.deq.channel_contraction`; ``rho(S) <= ||S||_2``, so looser, and
still a contraction constant, in a weighted sup-norm):

* ``'bjorck'`` (CerDEQ): nearest orthogonal flattened kernel, then scaled so
  that ``b(W) = scale``.
* ``'wn'`` (DEQ+WN): ``W = scale * V / (sqrt(k*k) * ||V||_F)`` (a closed-form
  guarantee for 'spectral'; with 'rho', ``W = scale * V / rho(V)``).
* ``'sn'`` (DEQ+SN): ``W = scale * V / sigma_max(V)`` by persisted power
  iteration, then clamped to ``b(W) <= scale`` *(ours)*.

``Parametrization.mode`` says where they act: ``'project'`` applies them to
the parameter W after every optimiser step (`project_tree`); ``'reparam'``
keeps a free parameter V (named `HIDDEN_FREE`) and the layer's forward pass
uses ``W(V)``, differentiated through (`cerdeq_jax.reparam`).

A kernel is HWIO ``(k, k, C_in, C_out)`` or dense ``(D_in, D_out)``; Björck
and the power iteration act on it flattened (`cerdeq_jax.orthogonal`).
Everything here is a pure, jit-able function of arrays (the array functions
are jitted themselves, with iteration counts static, so eager calls do not run
op by op); `Parametrization` is hashable, so it can be a static argument. The
initialisers live in `cerdeq_jax.initializers` (re-exported here).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cerdeq_jax.deq import abs_operator_bound, channel_contraction
# Re-exported: the initialisers and the primitives were defined here before.
from cerdeq_jax.initializers import (Initializer, cerdeq_injection_init,  # noqa: F401
                                     fan_in, fast_ibp_init)
from cerdeq_jax.orthogonal import (at_least_f32, bjorck, bjorck_kernel,  # noqa: F401
                                   flatten_kernel, initial_spectral_vector, power_iteration,
                                   singular_values)

HIGHEST = lax.Precision.HIGHEST
METHODS = ('bjorck', 'sn', 'wn')
MODES = ('project', 'reparam')
BOUNDS = ('spectral', 'rho')
#: Params-tree name of W ('project' mode) and of the free V ('reparam' mode).
HIDDEN_KERNEL = 'hidden_kernel'
HIDDEN_FREE = 'hidden_free'

# Rescaling by ``scale / b`` lands on ``scale`` only up to float32 rounding of b
# (an SVD, relative error ~1e-6, or rho, ~1e-7); aim slightly lower so that the
# *computed* bound of the result is <= scale too.
_ROUNDING_MARGIN = 1.0 - 1e-5


class Parametrization(NamedTuple):
  """How the hidden kernel is kept contractive.

  method: 'bjorck' (CerDEQ), 'sn' (spectral norm) or 'wn' (weight norm).
  scale: target bound s on the contraction constant, in (0, 1).
  iters: Björck iterations / power iterations per projection.
  mode: 'project' (W is the parameter, projected after every optimiser step)
    or 'reparam' (the parameter is a free V; the forward uses W(V)).
  bound: 'spectral' (``L = ||S||_2 <= s``) or 'rho' (the Perron-root bound
    ``rho <= s``; ``||S||_2`` may then exceed 1).
  """
  method: str = 'bjorck'
  scale: float = 0.95
  iters: int = 20
  mode: str = 'project'
  bound: str = 'spectral'

  @property
  def param_name(self) -> str:
    """The name of the layer's parameter: `HIDDEN_KERNEL` or `HIDDEN_FREE`."""
    return HIDDEN_FREE if self.mode == 'reparam' else HIDDEN_KERNEL


def validate(parametrization: Parametrization) -> Parametrization:
  """Raises ValueError on an unknown method/mode/bound, a scale outside (0, 1)
  or iters < 1."""
  p = parametrization
  for field, allowed in (('method', METHODS), ('mode', MODES), ('bound', BOUNDS)):
    if getattr(p, field) not in allowed:
      raise ValueError(f'unknown parametrization {field} {getattr(p, field)!r}; '
                       f'expected one of {allowed}')
  if not 0.0 < float(p.scale) < 1.0:
    raise ValueError(f'scale must lie in (0, 1), got {p.scale}')
  if int(p.iters) < 1:
    raise ValueError(f'iters must be >= 1, got {p.iters}')
  return p


def as_parametrization(p: Parametrization | str) -> Parametrization:
  """A method name ('bjorck' | 'sn' | 'wn') or a `Parametrization`, validated."""
  return validate(Parametrization(p) if isinstance(p, str) else p)


# --- projections -----------------------------------------------------------------

def contraction_bound(kernel, bound: str = 'spectral') -> jax.Array:
  """The bound that a parametrisation keeps <= scale: 'spectral': L
  (`abs_operator_bound`); 'rho': the Collatz–Wielandt rho of
  `channel_contraction` (differentiable with its vector v held fixed)."""
  if bound == 'spectral':
    return abs_operator_bound(kernel)
  if bound == 'rho':
    return channel_contraction(kernel)[1]
  raise ValueError(f'unknown bound {bound!r}; expected one of {BOUNDS}')


@functools.partial(jax.jit, static_argnames=('bound',))
def rescale_to_bound(kernel, scale, bound: str = 'spectral') -> jax.Array:
  """``kernel * scale / b(kernel)`` so that ``b(result) <= scale`` (computed)."""
  b = contraction_bound(kernel, bound)
  return kernel * (scale * _ROUNDING_MARGIN / b).astype(kernel.dtype)


@functools.partial(jax.jit, static_argnames=('bound',))
def clamp_to_bound(kernel, scale, bound: str = 'spectral') -> jax.Array:
  """Rescales only if ``b(kernel) > scale``; otherwise returns the kernel as is."""
  b = contraction_bound(kernel, bound)
  factor = jnp.where(b > scale, scale * _ROUNDING_MARGIN / b, 1.0)
  return kernel * factor.astype(kernel.dtype)


@functools.partial(jax.jit, static_argnames=('iters', 'bound'))
def project_bjorck(kernel, scale: float = 0.95, iters: int = 20,
                   bound: str = 'spectral') -> jax.Array:
  """CerDEQ: ``W = scale * Q / b(Q)`` with Q = `bjorck_kernel` (kernel).

  Orthogonality of the flattened kernel alone does not bound the conv operator
  (brief §3), hence the division by the rigorous bound b: ``b(W) ≈ scale``
  (slightly below, see `_ROUNDING_MARGIN`).
  """
  return rescale_to_bound(bjorck_kernel(kernel, iters), scale, bound)


@functools.partial(jax.jit, static_argnames=('bound',))
def project_weight_norm(kernel, scale: float = 0.95, bound: str = 'spectral') -> jax.Array:
  """DEQ+WN: ``W = scale * V / (sqrt(k*k) * ||V||_F)`` (k*k = 1 for dense).

  Why it is enough: by Cauchy–Schwarz over the k*k taps,
  ``S[o,i]^2 = (sum_t |K[t,i,o]|)^2 <= k*k * sum_t K[t,i,o]^2``, so
  ``||S||_2 <= ||S||_F <= sqrt(k*k) * ||K||_F`` and ``|| |W| ||_2 <= ||S||_2 <= scale``.
  (The computed `abs_operator_bound` adds its 1e-4 SVD safety factor on top;
  equality needs a rank-one S with equal |taps|, so in practice it stays far
  below ``scale``.) That guarantee is for ``||S||_2``; for ``bound='rho'`` the
  kernel is rescaled by its computed rho instead: ``W = scale * V / rho(V)``.
  """
  if bound == 'rho':
    return rescale_to_bound(kernel, scale, bound)
  taps = math.prod(kernel.shape[:-2])
  norm = jnp.sqrt(jnp.sum(jnp.square(at_least_f32(kernel))))
  norm = jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
  return kernel * (scale / (math.sqrt(taps) * norm)).astype(kernel.dtype)


@functools.partial(jax.jit, static_argnames=('iters',))
def spectral_normalize(kernel, u, scale: float = 0.95, iters: int = 1):
  """``W = scale * V / sigma`` with sigma from `power_iteration` on the
  flattened kernel. Returns ``(W, new_u, sigma)``; no contraction clamp."""
  # u is state, not a function of the weights (as in the usual SN).
  sigma, u = power_iteration(flatten_kernel(kernel), lax.stop_gradient(u), iters)
  sigma = jnp.maximum(sigma, jnp.finfo(jnp.float32).tiny)
  return kernel * (scale / sigma).astype(kernel.dtype), u, sigma


@functools.partial(jax.jit, static_argnames=('iters', 'bound'))
def project_spectral_norm(kernel, u, scale: float = 0.95, iters: int = 20,
                          bound: str = 'spectral'):
  """DEQ+SN: `spectral_normalize`, then if ``b(W) > scale``, ``W *= scale / b(W)``.

  The clamp is *(ours)*: a unit spectral norm of the flattened kernel does not
  bound ``|| |W| ||_2``, and without it the SN baseline's interval DEQ need
  not converge. Note ``||S||_2 >= ||flat(K)||_2`` always, so with the 1e-4
  safety factor in L the clamp (mildly, or strongly for mixed-sign conv
  kernels) fires whenever sigma has converged (for random kernels the rho
  clamp fires too: S is then nearly rank one, ``rho(S) ≈ ||S||_2``).

  Returns:
    ``(W, new_u)``; u, new_u: ``(C_out,)``.
  """
  w, u, _ = spectral_normalize(kernel, u, scale, iters)
  return clamp_to_bound(w, scale, bound), u


def project(kernel, state, parametrization: Parametrization):
  """Projects one hidden kernel (whatever the mode: in 'reparam' mode this is
  the initial value). Returns ``(kernel, state)``; state is the SN vector u
  ``(C_out,)`` for 'sn' (None -> a fixed start vector) and passes through
  unchanged otherwise."""
  p = as_parametrization(parametrization)
  if p.method == 'bjorck':
    return project_bjorck(kernel, p.scale, p.iters, p.bound), state
  if p.method == 'wn':
    return project_weight_norm(kernel, p.scale, p.bound), state
  if state is None:  # deterministic start; persist the returned u afterwards
    state = initial_spectral_vector(jax.random.PRNGKey(0), kernel)
  return project_spectral_norm(kernel, state, p.scale, p.iters, p.bound)


def advance_spectral(free, state, parametrization: Parametrization):
  """'reparam' mode after an optimiser step: V is left alone; for 'sn' the
  persisted vector u advances by ``iters`` power iterations on the new V.
  Returns ``(free, state)``."""
  p = as_parametrization(parametrization)
  if p.method != 'sn':
    return free, state
  if state is None:
    state = initial_spectral_vector(jax.random.PRNGKey(0), free)
  return free, power_iteration(flatten_kernel(free), state, p.iters)[1]


def _is_leaf(x) -> bool:
  return not isinstance(x, Mapping)


def project_tree(params, states, parametrization: Parametrization | str,
                 name: str | None = None):
  """The after-step update of every leaf of a (nested dict) params tree whose
  key is ``name`` (default ``parametrization.param_name``): `project` in
  'project' mode; in 'reparam' mode the free V is left alone
  (`advance_spectral`). All other leaves are returned untouched.

  Args:
    params: nested Mapping of arrays (e.g. Flax ``params``).
    states: nested Mapping with the same nesting holding the SN vector (or
      None) under each ``name`` key, e.g. from `init_spectral_states`; None
      (anywhere) means "no state".

  Returns:
    ``(params, states)`` with the same container types.
  """
  parametrization = as_parametrization(parametrization)
  name = name or parametrization.param_name
  update = project if parametrization.mode == 'project' else advance_spectral

  def walk(p, s):
    new_p, new_s = {}, {}
    for key, value in p.items():
      sub = s.get(key) if isinstance(s, Mapping) else None
      if key == name and _is_leaf(value):
        new_p[key], state = update(value, sub, parametrization)
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


def init_spectral_states(key, params, name: str = HIDDEN_KERNEL):
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
