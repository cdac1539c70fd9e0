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


def tightness_regulariser(input_box: Interval, preactivations: Sequence[Interval],
                          tau: float = 0.5) -> jax.Array:
  """Fast-IBP tightness term: per ReLU layer ``relu(tau - mean(r_in) / mean(r_l)) / tau``
  (bounds should not grow faster than the input's), averaged over layers."""
  r_in = jnp.mean(input_box.radius)
  terms = [jax.nn.relu(tau - r_in / (jnp.mean(b.radius) + 1e-12)) / tau for b in preactivations]
  return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros(())


def _ratio(a, b):
  return jnp.minimum(a / (b + 1e-12), b / (a + 1e-12))


def relu_balance_regulariser(preactivations: Sequence[Interval], tau: float = 0.5) -> jax.Array:
  """Fast-IBP ReLU-balance term *(our reading of the recipe)*: for each ReLU
  layer, the pre-activation centres ``c`` should be balanced between active
  and inactive: hinge at ``tau`` on the ratio of the means of ``relu(c)`` and
  ``relu(-c)`` and on the ratio of their variances, averaged over layers."""
  terms = []
  for b in preactivations:
    c = b.centre
    pos, neg = jax.nn.relu(c), jax.nn.relu(-c)
    terms.append(jax.nn.relu(tau - _ratio(jnp.mean(pos), jnp.mean(neg))) / tau
                 + jax.nn.relu(tau - _ratio(jnp.var(pos), jnp.var(neg))) / tau)
  return jnp.mean(jnp.stack(terms)) if terms else jnp.zeros(())


def warmup_weight(eps, eps_max: float, lam: float):
  """``lam * (1 - eps / eps_max)``: the regularisers fade out as ε reaches its max."""
  return lam * (1 - eps / eps_max)
