"""Certified-training losses: elided IBP cross-entropy, κ mixing, and the
Fast-IBP warm-up regularisers."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from cerdeq_jax.interval import Interval


def natural_cross_entropy(logits, labels) -> jax.Array:
  """Mean cross-entropy of clean logits ``(N, K)``."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def robust_cross_entropy(margins) -> jax.Array:
  """Mean cross-entropy of the worst-case logits ``-margins``.

  ``margins``: ``(N, K)`` lower bounds of ``logit_y - logit_j`` (0 at ``j = y``),
  so the worst-case logit vector is ``-margins`` and the true class has logit 0:
  the loss is ``logsumexp(-margins)``.
  """
  return jnp.mean(jax.nn.logsumexp(-margins, axis=-1))


def mixed_loss(natural, robust, kappa) -> jax.Array:
  """``kappa * natural + (1 - kappa) * robust``."""
  return kappa * natural + (1 - kappa) * robust


# --- Fast-IBP warm-up regularisers -----------------------------------------
# Reference: shizhouxing/Fast-Certified-Robust-Training, regularization.py,
# `compute_reg` (lines 59-146); the defaults `--reg-obj relu tightness`,
# `--tol 0.5` are in argparser.py (lines 9, 18).


def tightness_regulariser(input_box: Interval, preactivations: Sequence[Interval],
                          tau: float = 0.5) -> jax.Array:
  """Fast-IBP tightness term, averaged over the ReLU layers.

  Per ReLU layer with pre-activation bounds of any shape:
  ``relu(tau - t0 / max(t, 1e-12)) / tau``, ``t0`` the mean radius of
  ``input_box``, ``t`` the mean radius of the layer's bounds (means over all
  elements, batch included): bounds should not grow faster than ``t0 / tau``.
  As published (regularization.py:71, 80, 84, 125). 0 without ReLU layers.
  """
  if not preactivations:
    return jnp.zeros(())
  t0 = jnp.mean(input_box.radius)
  terms = [jax.nn.relu(tau - t0 / jnp.maximum(jnp.mean(b.radius), 1e-12)) / tau
           for b in preactivations]
  return jnp.mean(jnp.stack(terms))


def _folded(num, den):
  """``min(r, 1/r)`` of ``r = num / den`` for ``num, den >= 0``, written as
  ``min / max`` so that no inf appears; ``defined`` is False where the
  published code gets NaN (``0 / 0``). ``den = 0 < num`` gives 0, as
  ``min(inf, 1/inf)`` does there."""
  hi = jnp.maximum(num, den)
  defined = hi > 0
  return jnp.minimum(num, den) / jnp.where(defined, hi, 1.0), defined


def relu_balance_term(bounds: Interval, tau: float = 0.5):
  """The published ReLU-balance term of one ReLU layer (regularization.py:88-104).

  ``bounds``: pre-activation bounds, any shape (batch included); ``c`` the
  centres. Masks ``A = [lower > 0]`` (active), ``I = [upper < 0]`` (inactive);
  ``mean_act = mean(c * A)``, ``mean_inact = mean(c * I)`` (means over *all*
  elements); ``var_act = sum((c - mean(c))^2 * A)``, ``var_inact`` likewise
  (sums, and the mean of all centres). Ratios ``mean_act / -mean_inact`` and
  ``var_act / var_inact``, each folded to ``min(r, 1/r)``; the term is
  ``(relu(tau - mean ratio) + relu(tau - var ratio)) / tau``.

  Returns ``(term, counted)``, scalars. The published code adds the term only
  when it is finite. Its ``mean_act / -mean_inact`` is ``-inf`` or NaN
  whenever no unit is inactive (``-mean_inact`` is then ``-0.0``), so such a
  layer is *skipped* (``counted`` False), while a layer with no active unit
  is counted with the full penalty 2. Both cases are written out here with
  finite arithmetic, so the gradient of a skipped layer is 0, not NaN.
  """
  c = bounds.centre
  active = (bounds.lower > 0).astype(c.dtype)
  inactive = (bounds.upper < 0).astype(c.dtype)
  mean_act, mean_inact = jnp.mean(c * active), jnp.mean(c * inactive)
  delta = jnp.square(c - jnp.mean(c))
  var_act, var_inact = jnp.sum(delta * active), jnp.sum(delta * inactive)
  mean_ratio, _ = _folded(mean_act, -mean_inact)
  var_ratio, var_defined = _folded(var_act, var_inact)
  term = (jax.nn.relu(tau - mean_ratio) + jax.nn.relu(tau - var_ratio)) / tau
  counted = (mean_inact < 0) & var_defined & jnp.isfinite(term)
  return jnp.where(counted, term, 0.0), counted


def relu_balance_regulariser(preactivations: Sequence[Interval], tau: float = 0.5) -> jax.Array:
  """`relu_balance_term` summed over the ReLU layers and divided by the number
  of ReLU layers, skipped ones included (regularization.py:103-104, 127). 0
  without ReLU layers."""
  if not preactivations:
    return jnp.zeros(())
  return sum(relu_balance_term(b, tau)[0] for b in preactivations) / len(preactivations)


def warmup_regulariser(input_box: Interval, preactivations: Sequence[Interval],
                       tau: float = 0.5) -> jax.Array:
  """The published default objective, tightness + ReLU balance (argparser.py:9);
  the 'std' term that `compute_reg` also computes is not in that default."""
  return (tightness_regulariser(input_box, preactivations, tau)
          + relu_balance_regulariser(preactivations, tau))


def warmup_weight(eps, eps_max: float, lam: float):
  """``lam * (1 - eps / eps_max)`` with ``eps`` the *scheduled* ε (0 in the
  warm-up, even though its bounds are taken at a tiny ε): the regularisers
  fade out as ε reaches its max (regularization.py:143)."""
  return lam * (1 - eps / eps_max)


def hinge_loss(margins, mix: float = 1.0) -> jax.Array:
  """The ℓ∞-dist Net hinge loss (zbh2047/L_inf-dist-net, main.py ``hinge``) on
  margins ``(N, K)`` (lower bounds of ``logit_y - logit_j``, 0 at ``j = y``):
  ``mix·mean_n(max_j relu(-m_nj)) + (1 - mix)·mean_nj(relu(-m_nj))``. A
  threshold θ enters through the margins (e.g. ``m - 2r``)."""
  violation = jax.nn.relu(-margins)
  return mix * jnp.mean(jnp.max(violation, -1)) + (1 - mix) * jnp.mean(violation)
