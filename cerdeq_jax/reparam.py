"""The hidden kernel as a function of a free parameter ('reparam' mode).

In 'reparam' mode (`parametrize.Parametrization.mode`) the DEQ layer holds a
free parameter V (`parametrize.HIDDEN_FREE`) and its forward pass uses

* 'bjorck': ``W = s * B(V) / b(B(V))`` (B: Björck on the flattened kernel),
* 'wn':     ``W = s * V / (k * ||V||_F)``  ('rho' bound: ``s * V / rho(V)``),
* 'sn':     ``W = s * V / sigma(V, u)``, then clamped to ``b(W) <= s``,

with ``b`` the bound chosen by ``Parametrization.bound`` (L or rho). Gradients
flow through the Björck iterations and through b (an SVD for L; for rho with
the Perron vector v held fixed: ``max_o (S v)_o / v_o`` bounds rho(S) for any
positive v). Nothing is projected after the optimiser step; for 'sn' the
persisted power-iteration vector u is advanced there (`parametrize.project_tree`)
and read, not updated, by the forward, so every call within one ``apply``
(clean batch, interval, attack) uses the same W.

Soundness does not depend on any of this: the certificate is computed from
the W that the solve actually used (`deq.solve_deq`).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from cerdeq_jax import parametrize as pz


def spectral_sigma(free, u) -> jax.Array:
  """``sigma = v^T flat(V) u`` with ``v = flat(V) u / ||flat(V) u||``: the
  power-iteration estimate of ``sigma_max(flat(V))`` from the persisted unit
  ``u (C_out,)`` (a lower bound). As in Flax's ``SpectralNorm``, u and v are
  constants for the gradient: ``d sigma = v^T d(flat V) u``."""
  m = pz.flatten_kernel(pz.at_least_f32(free))
  u = jax.lax.stop_gradient(u.astype(m.dtype))
  mu = jnp.matmul(m, u, precision=pz.HIGHEST)
  v = jax.lax.stop_gradient(mu / jnp.maximum(jnp.linalg.norm(mu), jnp.finfo(m.dtype).tiny))
  return jnp.maximum(jnp.dot(v, mu, precision=pz.HIGHEST), jnp.finfo(m.dtype).tiny)


def effective_kernel(free, u, parametrization: pz.Parametrization | str) -> jax.Array:
  """The kernel W ``(k, k, C, C)`` that the layer uses, from the free V (same
  shape) and, for 'sn', the persisted vector u ``(C,)`` (ignored otherwise).
  ``b(W) <= scale`` as computed by `parametrize.contraction_bound`."""
  p = pz.as_parametrization(parametrization)
  if p.method == 'bjorck':
    return pz.project_bjorck(free, p.scale, p.iters, p.bound)
  if p.method == 'wn':
    return pz.project_weight_norm(free, p.scale, p.bound)
  w = free * (p.scale / spectral_sigma(free, u)).astype(free.dtype)
  return pz.clamp_to_bound(w, p.scale, p.bound)


def hidden_kernel(layer_params: Mapping, layer_spectral: Mapping | None,
                  parametrization: pz.Parametrization | str) -> jax.Array:
  """The effective W of one DEQ layer from its variables, in either mode.

  Args:
    layer_params: the layer's params (e.g. ``state.params['deq']``), holding
      `parametrize.HIDDEN_KERNEL` ('project') or `parametrize.HIDDEN_FREE`.
    layer_spectral: the layer's ``'spectral'`` collection (e.g.
      ``state.spectral.get('deq')``); needed for 'sn' in 'reparam' mode.
  """
  p = pz.as_parametrization(parametrization)
  if p.mode == 'project':
    return layer_params[pz.HIDDEN_KERNEL]
  free = layer_params[pz.HIDDEN_FREE]
  u = layer_spectral[pz.HIDDEN_FREE] if p.method == 'sn' else None
  return effective_kernel(free, u, p)
