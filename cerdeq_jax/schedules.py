"""Schedules as pure functions of the (global) optimiser step.

ε (in [0,1] pixel units) and the κ mixing weight follow the Fast-IBP recipe
(Shi et al. 2021); learning rates are optax schedules.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import optax


def smooth_ramp(t, mid: float = 0.25, power: float = 4.0):
  """``[0, 1] -> [0, 1]``: ``a t^power`` up to ``mid``, then linear, joined with
  a continuous value and derivative (Fast-IBP's smoothed scheduler). ``mid = 0``
  is the linear ramp (the limit; the published formula divides by 0 there)."""
  t = jnp.clip(t, 0.0, 1.0)
  if mid <= 0:
    return t
  a = 1.0 / (mid ** (power - 1) * (power - power * mid + mid))
  slope = a * power * mid ** (power - 1)
  return jnp.where(t <= mid, a * t ** power, a * mid ** power + slope * (t - mid))


def ramp_fraction(step, steps_per_epoch: int, start_epochs: float, length_epochs: float):
  """Fraction of the ε ramp completed at ``step`` (0 before, 1 after)."""
  start = start_epochs * steps_per_epoch
  length = max(length_epochs * steps_per_epoch, 1)
  return jnp.clip((jnp.asarray(step, jnp.float32) - start) / length, 0.0, 1.0)


def mid_fraction(steps_per_epoch: int, length_epochs: float, mid: float = 0.25) -> float:
  """Where the ramp turns linear, as a fraction of the ramp: auto_LiRPA's
  ``SmoothedScheduler`` puts it at the whole step ``int(length_steps * mid)``
  after the start (eps_scheduler.py, ``step_batch``), not at ``mid`` itself."""
  length = max(length_epochs * steps_per_epoch, 1)
  return math.floor(length * mid) / length


def epsilon(step, eps_max: float, steps_per_epoch: int, start_epochs: float = 1,
            length_epochs: float = 20, mid: float = 0.25, power: float = 4.0):
  """ε at ``step`` (0-based global step): 0 up to step ``start_epochs *
  steps_per_epoch`` included, the smooth ramp over ``length_epochs``, then
  ``eps_max``. Per batch (changes every step). ``start_epochs = s`` is the
  published ``--scheduler_opts start=s+1`` (its epochs count from 1)."""
  frac = ramp_fraction(step, steps_per_epoch, start_epochs, length_epochs)
  return eps_max * smooth_ramp(frac, mid_fraction(steps_per_epoch, length_epochs, mid), power)


def kappa(step, steps_per_epoch: int, start_epochs: float, length_epochs: float,
          kappa_start: float = 1.0, kappa_end: float = 0.5):
  """Weight of the natural loss: linear from ``kappa_start`` to ``kappa_end``
  over the ε ramp (classic IBP mixing, Gowal et al. 2018)."""
  frac = ramp_fraction(step, steps_per_epoch, start_epochs, length_epochs)
  return kappa_start + (kappa_end - kappa_start) * frac


def learning_rate(base: float, steps_per_epoch: int, milestones: Sequence[float],
                  factor: float = 0.2) -> optax.Schedule:
  """Piecewise-constant lr: ``base``, times ``factor`` at each milestone epoch."""
  return optax.piecewise_constant_schedule(
      base, {int(m * steps_per_epoch): factor for m in milestones})


def optimizer(lr: optax.ScalarOrSchedule, clip_norm: float = 10.0) -> optax.GradientTransformation:
  """Adam with global-norm gradient clipping (the Fast-IBP recipe)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(lr))
