"""ℓ∞ PGD (Madry et al. 2018) in normalised input space, inside an `Interval` box.

Gradients through DEQ layers are the implicit ones, so the attack never
backpropagates through solver iterations.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cerdeq_jax.interval import Interval


def pgd(logits_fn: Callable, x, labels, box: Interval, key, steps: int = 10,
        restarts: int = 1, step_fraction: float = 2.5):
  """Searches the box for misclassified points.

  Args:
    logits_fn: ``x -> logits (N, K)`` (e.g. a model in eval mode).
    x: clean normalised inputs ``(N, ...)``, inside ``box``.
    labels: ``(N,)`` int.
    box: the ε ball (see `linf_ball`), same shape as x.
    key: PRNG key for the random starts (restart 0 starts at ``x``).
    steps: sign-gradient steps per restart, of size
      ``step_fraction * radius / steps`` per element.
    restarts: number of starts.

  Returns:
    ``(x_adv, broken)``: the strongest point found per sample (the first
    misclassified point where one was found, else the point of highest
    cross-entropy) and a bool
    ``(N,)`` that is True where some point of the box (the clean point
    included) is misclassified.
  """
  step_size = step_fraction * box.radius / steps

  def loss(z):
    logits = logits_fn(z)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), logits

  grad_fn = jax.grad(loss, has_aux=True)

  def wrong(logits):
    return jnp.argmax(logits, -1) != labels

  def per_sample(mask, z):
    return mask.reshape((-1,) + (1,) * (z.ndim - 1))

  def keep(z, logits, best, best_loss, broken):
    # A broken sample keeps its first misclassified iterate (a later step
    # could undo it); the others keep the iterate of highest loss.
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    newly = wrong(logits) & ~broken
    better = newly | (~broken & (loss > best_loss))
    best = jnp.where(per_sample(better, z), z, best)
    return best, jnp.where(better, loss, best_loss), broken | newly

  def attack(start):
    z, best, broken = start, start, jnp.zeros(labels.shape, bool)
    best_loss = jnp.full(labels.shape, -jnp.inf)
    # A Python loop (unrolled under jit): XLA:CPU runs the transposed convs of
    # a backward pass ~15x slower inside loop bodies (docs/performance.md).
    for _ in range(steps):
      g, logits = grad_fn(z)
      best, best_loss, broken = keep(z, logits, best, best_loss, broken)
      z = jnp.clip(z + step_size * jnp.sign(g), box.lower, box.upper)
    return keep(z, logits_fn(z), best, best_loss, broken)

  x_adv, adv_loss, broken = attack(x)
  for k in jax.random.split(key, restarts)[1:]:
    start = jax.random.uniform(k, x.shape, x.dtype, box.lower, box.upper)
    cand, cand_loss, cand_broken = attack(start)
    take = (cand_broken & ~broken) | (~cand_broken & ~broken & (cand_loss > adv_loss))
    x_adv = jnp.where(per_sample(take, x), cand, x_adv)
    adv_loss = jnp.where(take, cand_loss, adv_loss)
    broken = broken | cand_broken
  return x_adv, broken
