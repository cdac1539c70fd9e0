"""What a certified train step needs to know: `CertifiedTraining` (static
under ``jit``: ε, κ and β schedules, regulariser window, loss and bound
method, precision) and the `StepKind` it selects at each step."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from cerdeq_jax import parametrize, schedules
from cerdeq_jax import precision as policy

#: Bounds of the certified loss (`CertifiedTraining.method`).
METHODS = ('ibp', 'crown_ibp', 'linf_dist')
#: Extra verifiers of `eval_step`: CROWN-IBP, or CROWN with CROWN intermediate bounds.
VERIFIERS = ('crown_ibp', 'crown')


@dataclasses.dataclass(frozen=True)
class CertifiedTraining:
  """What a certified train step needs to know (static under ``jit``).

  eps: target radius in [0, 1] pixel units; mean/std: per-channel
  normalisation; the ε schedule is per batch: 0 for ``eps_start_epochs``,
  smooth ramp over ``eps_length_epochs``, then ``eps``. ``loss`` is
  ``'fast_ibp'`` (natural loss while ε = 0, then the pure IBP loss) or
  ``'mixed'`` (``κ·CE_nat + (1-κ)·CE_rob``, κ from ``kappa_start`` to
  ``kappa_end`` over the ramp).

  Fast-IBP warm-up regularisers (`losses.warmup_regulariser`, τ =
  ``reg_tau``), as in the published train.py (lines 60-97): on from the first
  step through the last step of epoch ``eps_start_epochs + eps_length_epochs
  - 1`` (0-based; the published ``t <= start + length - 1``, argparser.py:
  108, with 1-based epochs and ``start = eps_start_epochs + 1``), with weight
  ``reg_lambda * (1 - ε/eps)``. While the scheduled ε is 0 the bounds are
  taken at ``reg_min_eps`` (published ``--min-eps-reg``, certified.py:66-67)
  and the loss is the natural one plus the regulariser. ``reg_lambda = 0``
  (or ``eps = 0``) turns them off.

  ``method``: the bound of the certified loss. ``'ibp'``; or ``'crown_ibp'``
  (Zhang et al. 2020): ``β·CROWN-IBP + (1-β)·IBP`` margin bounds with
  ``β = 1 - (1 - beta_end)·ε/eps`` (the published train.py: 1 at ε = 0,
  ``beta_end`` at the full ε; the CROWN pass is skipped where β < 1e-5).
  ``'linf_dist'``: the ℓ∞-dist Net objective of ``linf`` (a
  `linf_training.LinfTraining`: p schedule, Lipschitz radius, hinge loss); its
  certificates are the model's interval margins at p = ∞ as for any model.

  ``precision``: of the layer products in training passes (nominal and
  interval; `cerdeq_jax.precision`): ``'default'`` lets TPUs/TF32 GPUs use
  their fast float32 matmuls there. Certificates are unaffected: the DEQ
  solves, the bounds L and rho and the margins stay at ``HIGHEST``, and
  `eval_step` runs everything at ``HIGHEST`` whatever this is. No effect on CPU.
  """
  eps: float
  mean: tuple[float, ...]
  std: tuple[float, ...]
  steps_per_epoch: int
  eps_start_epochs: float = 1.0
  eps_length_epochs: float = 20.0
  loss: str = 'fast_ibp'
  kappa_start: float = 1.0
  kappa_end: float = 0.5
  reg_lambda: float = 0.5
  reg_tau: float = 0.5
  reg_min_eps: float = 1e-6
  parametrization: parametrize.Parametrization | None = None
  method: str = 'ibp'
  beta_end: float = 0.0
  linf: Any = None
  precision: str = 'default'

  def __post_init__(self):
    if not np.isfinite(self.eps) or self.eps < 0:
      raise ValueError(f'eps must be a finite number >= 0, got {self.eps}.')
    if self.loss not in ('fast_ibp', 'mixed'):
      raise ValueError(f"loss must be 'fast_ibp' or 'mixed', got {self.loss!r}.")
    if self.method not in METHODS:
      raise ValueError(f'method must be one of {METHODS}, got {self.method!r}.')
    if (self.method == 'linf_dist') != (self.linf is not None):
      raise ValueError("method 'linf_dist' goes with linf= (a LinfTraining), and only it.")
    policy.parse(self.precision)

  def epsilon(self, step):
    return schedules.epsilon(step, self.eps, self.steps_per_epoch,
                             self.eps_start_epochs, self.eps_length_epochs)

  def kappa(self, step):
    return schedules.kappa(step, self.steps_per_epoch, self.eps_start_epochs,
                           self.eps_length_epochs, self.kappa_start, self.kappa_end)

  def beta(self, step):
    """CROWN-IBP's weight of the CROWN-IBP bound (1 -> ``beta_end`` with ε)."""
    return 1 - (1 - self.beta_end) * self.epsilon(step) / max(self.eps, 1e-12)

  def is_crown_step(self, step: int) -> bool:
    """Host-side: whether the loss at ``step`` needs the CROWN-IBP pass."""
    return (self.method == 'crown_ibp' and self.is_certified_step(step)
            and float(self.beta(step)) >= 1e-5)

  def is_certified_step(self, step: int) -> bool:
    """Host-side: whether the loss at ``step`` is on bounds (ε > 0)."""
    return float(self.epsilon(step)) > 0

  def is_regularised_step(self, step: int) -> bool:
    """Host-side: whether ``step`` adds the warm-up regularisers (by epoch,
    as published: through epoch ``eps_start_epochs + eps_length_epochs - 1``)."""
    epoch = int(step) // self.steps_per_epoch
    return (self.reg_lambda > 0 and self.eps > 0
            and epoch < self.eps_start_epochs + self.eps_length_epochs)

  def step_kind(self, step: int) -> 'StepKind':
    """Which compiled train step runs at ``step``: a pure function of the
    step, so that a resumed run takes the same steps as an uninterrupted one."""
    if self.method == 'linf_dist':  # one step: its schedules are traced
      return StepKind(True, False)
    return StepKind(self.is_certified_step(step), self.is_regularised_step(step),
                    self.is_crown_step(step))


class StepKind(NamedTuple):
  """The static variant of a train step. ``certified``: the loss is on the
  bounds at the scheduled ε > 0 (else the natural loss); ``regularised``: the
  warm-up regularisers are added (their bounds then run even when not
  ``certified``); ``crown``: the certified loss mixes in CROWN-IBP bounds."""
  certified: bool
  regularised: bool
  crown: bool = False

  @property
  def bounds(self) -> bool:
    """Whether the step runs the interval pass."""
    return self.certified or self.regularised
