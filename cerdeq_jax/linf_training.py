"""Training of ℓ∞-dist Nets as published (zbh2047/L_inf-dist-net, ``main.py``,
``adamw.py``; commands in its ``command/`` folder).

* ``p`` of every ℓp-dist layer: ``p_start`` up to epoch ``p_start_epochs``, then
  ``p_start·(p_end/p_start)^ratio`` over ``[p_start_epochs, p_end_epochs]``
  (per batch), then ∞ (``create_schedule``).
* The training radius ``eps_train`` (pixel units, larger than the test ε),
  ramped linearly over ``[eps_start_epochs, + eps_length_epochs]`` (published
  ``epochs`` entries 0 and 2; length 0: constant), in normalised units
  ``eps/std`` (the largest over channels).
* Loss ``kappa·L(worst) + (1 - kappa)·L(clean)`` (published ``Loss``), L the
  hinge ``mix·mean(max_j relu(-m_j)) + (1 - mix)·mean(relu(-m))`` or the cross
  entropy, on margins ``m`` (worst: `models.linf_dist.LinfDistNet`'s Lipschitz
  margins, i.e. the clean margin minus ``2r`` for the pure net).
* Optimiser: Adam (β 0.9, 0.99, eps 1e-10), lr constant up to
  ``p_start_epochs`` then cosine to 0 at the end, and *decoupled ℓp weight
  decay*: each ℓ∞-dist neuron's weight row moves by ``-lr·wd·∇(½||w||_p²)``
  with the layers' current p (at ∞ only its largest entry decays); every other
  parameter by ``-lr·wd·w``. No gradient clipping.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cerdeq_jax import losses
from cerdeq_jax.linf_dist import DIST_WEIGHT


@dataclasses.dataclass(frozen=True)
class LinfTraining:
  """Schedules and loss of ℓ∞-dist Net training (static under ``jit``)."""
  eps_train: float
  steps_per_epoch: int
  eps_start_epochs: float = 0.0
  eps_length_epochs: float = 0.0
  p_start: float = 8.0
  p_end: float = 1000.0
  p_start_epochs: float = 50.0
  p_end_epochs: float = 350.0
  loss: str = 'hinge'
  hinge_mix: float = 1.0
  kappa: float = 1.0

  def __post_init__(self):
    if self.loss not in ('hinge', 'cross_entropy'):
      raise ValueError(f"loss must be 'hinge' or 'cross_entropy', got {self.loss!r}.")
    if not 1 <= self.p_start <= self.p_end:
      raise ValueError(f'need 1 <= p_start <= p_end, got {self.p_start}, {self.p_end}.')
    if self.p_end_epochs < self.p_start_epochs:
      raise ValueError('p_end_epochs must not precede p_start_epochs.')

  def p(self, step) -> jax.Array:
    """The layers' p at ``step`` (∞ once the ramp is over; no ramp: ∞ from
    ``p_start_epochs`` on)."""
    start = self.p_start_epochs * self.steps_per_epoch
    length = (self.p_end_epochs - self.p_start_epochs) * self.steps_per_epoch
    step = jnp.asarray(step, jnp.float32)
    if length > 0:
      ratio = jnp.clip((step - start) / length, 0.0, 1.0)
    else:
      ratio = (step >= start).astype(jnp.float32)
    p = self.p_start * jnp.exp(math.log(self.p_end / self.p_start) * ratio)
    return jnp.where(ratio >= 1, jnp.inf, p)

  def eps(self, step) -> jax.Array:
    """Training radius at ``step`` in pixel units (linear ramp)."""
    if self.eps_length_epochs <= 0:
      return jnp.asarray(self.eps_train, jnp.float32)
    start = self.eps_start_epochs * self.steps_per_epoch
    length = self.eps_length_epochs * self.steps_per_epoch
    return self.eps_train * jnp.clip((jnp.asarray(step, jnp.float32) - start) / length, 0.0, 1.0)

  def radius(self, step, std) -> jax.Array:
    """The radius in normalised units (an ℓ∞ ball of ``eps/std_c`` per channel
    lies in the cube of the largest)."""
    return self.eps(step) / min(std)

  def objective(self, logits, margins, labels) -> jax.Array:
    """``kappa·L(worst margins) + (1 - kappa)·L(clean margins)``."""
    clean = jnp.take_along_axis(logits, labels[:, None], 1) - logits
    if self.loss == 'hinge':
      term = lambda m: losses.hinge_loss(m, self.hinge_mix)
    else:
      term = losses.robust_cross_entropy   # CE of the logits -m (the true class at 0)
    return self.kappa * term(margins) + (1 - self.kappa) * term(clean)


def lp_decay_direction(w, p, eps: float = 1e-10) -> jax.Array:
  """``∇(½||w_o||_p²)`` per row ``w_o`` of ``(O, D)`` (published adamw.py, in
  max-normalised form: no overflow at large p; at ``p = ∞`` the largest entry
  of each row only)."""
  sq = w * w + eps
  sq = sq / jnp.max(sq, 1, keepdims=True)
  finite = jnp.isfinite(p)
  p_safe = jnp.where(finite, p, 2.0)
  power = sq ** (p_safe / 2 - 1)
  total = jnp.sum(sq * power, 1, keepdims=True)
  direction = total ** (2 / p_safe - 1) * power * w
  at_max = jax.nn.one_hot(jnp.argmax(jnp.abs(w), 1), w.shape[1], dtype=w.dtype) * w
  return jnp.where(finite, direction, at_max)


class _DecayState(NamedTuple):
  count: jax.Array


def lp_weight_decay(learning_rate, weight_decay: float, p_fn) -> optax.GradientTransformation:
  """Adds ``-lr(t)·wd·d(w)`` to the updates, ``d`` = `lp_decay_direction` at
  ``p_fn(t)`` for leaves named `DIST_WEIGHT`, ``d(w) = w`` otherwise."""
  def init(params):
    del params
    return _DecayState(jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    lr, p = learning_rate(state.count), p_fn(state.count)

    def decay(path, u, w):
      d = lp_decay_direction(w, p) if path[-1].key == DIST_WEIGHT else w
      return u - lr * weight_decay * d
    return (jax.tree_util.tree_map_with_path(decay, updates, params),
            _DecayState(state.count + 1))
  return optax.GradientTransformation(init, update)


def cosine_after(base: float, steps_per_epoch: int, start_epochs: float,
                 total_epochs: float) -> optax.Schedule:
  """``base`` up to ``start_epochs``, then ``base·(1 + cos(π·ratio))/2`` to 0 at the end."""
  start = start_epochs * steps_per_epoch
  length = max((total_epochs - start_epochs) * steps_per_epoch, 1)

  def schedule(step):
    ratio = jnp.clip((jnp.asarray(step, jnp.float32) - start) / length, 0.0, 1.0)
    return 0.5 * base * (1 + jnp.cos(math.pi * ratio))
  return schedule


def optimizer(base_lr: float, steps_per_epoch: int, total_epochs: float, weight_decay: float,
              training: LinfTraining) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The published optimiser: ``(tx, lr schedule)``."""
  lr = cosine_after(base_lr, steps_per_epoch, training.p_start_epochs, total_epochs)
  tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.99, eps=1e-10),
                   optax.scale_by_learning_rate(lr),
                   lp_weight_decay(lr, weight_decay, training.p))
  return tx, lr
