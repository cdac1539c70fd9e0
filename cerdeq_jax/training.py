"""Certified training and evaluation steps, jit-compiled over a device mesh.

The batch is sharded over a 1-D ``Mesh`` axis ``'data'`` (all devices of all
processes); parameters and optimiser state are replicated. BatchNorm moments
are plain means over the (global) batch axis, so under ``jit`` they are taken
over the global batch. The parametrisation's projection (Björck / WN / SN) is
applied after the optimiser update, inside the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cerdeq_jax import attacks, crown, ibp, losses, parametrize, schedules
from cerdeq_jax import precision as policy
from cerdeq_jax.interval import Interval, linf_ball
from cerdeq_jax.layers import BATCH_MOMENTS, SPECTRAL

DATA_AXIS = 'data'
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


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  spectral: Any
  opt_state: Any

  def variables(self, params=None) -> dict:
    variables = {'params': self.params if params is None else params,
                 'batch_stats': self.batch_stats}
    if self.spectral:
      variables[SPECTRAL] = self.spectral
    return variables


def init_state(model: nn.Module, tx: optax.GradientTransformation, key, sample_x,
               parametrization: parametrize.Parametrization | None = None) -> TrainState:
  """Initialises parameters on ``sample_x`` (one batch, NHWC)."""
  # jit: an op-by-op init of a DEQ model costs seconds of dispatch on CPU.
  variables = jax.jit(lambda k, x: model.init({'params': k}, x, train=False))(key, sample_x)
  params = variables['params']
  return TrainState(jnp.zeros((), jnp.int32), params, variables.get('batch_stats', {}),
                    variables.get(SPECTRAL, {}), tx.init(params))


def clean_and_bounds(model: nn.Module, variables, x, box: Interval, labels, train: bool,
                     mutable=()):
  """One ``apply`` that runs the clean batch, then the interval (so that
  BatchNorm in training bounds with the clean batch's moments).

  Returns ``((logits, margins), collections)``; margins are the lower bounds of
  ``logit_y - logit_j``.
  """
  def both(module, x, box, labels):
    return module(x, train=train), module(box, train=train, labels=labels)
  return model.apply(variables, x, box, labels, method=both,
                     mutable=list(mutable) + ([BATCH_MOMENTS] if train else []))


def sown(collection, name: str | None = None, cls=None) -> list:
  """Leaves of a sown collection (optionally only those under key ``name``)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(collection) if collection else {})
  out = []
  for path, values in flat.items():
    if name is None or path[-1] == name:
      out.extend(values)
  return out


def deq_summary(stats: list) -> dict:
  """Batch means of sown `DEQStats` (all DEQ layers together)."""
  if not stats:
    return {}
  cat = lambda f: jnp.concatenate([jnp.ravel(getattr(s, f)) for s in stats])
  return {'deq_iterations': jnp.mean(cat('iterations').astype(jnp.float32)),
          'deq_residual': jnp.mean(cat('residual')),
          'deq_converged': jnp.mean(cat('converged').astype(jnp.float32)),
          'deq_lipschitz': jnp.max(cat('lipschitz'))}


def _loss_fn(params, state: TrainState, batch, model, cfg: CertifiedTraining, kind: StepKind):
  x, labels = batch['image'], batch['label']
  variables = state.variables(params)
  metrics = {}
  if cfg.method == 'linf_dist':
    lt = cfg.linf
    p, radius = lt.p(state.step), lt.radius(state.step, cfg.std)
    (logits, margins), cols = model.apply(variables, x, train=True, labels=labels, p=p,
                                          radius=radius, mutable=['batch_stats'])
    loss = lt.objective(logits, margins, labels)
    metrics.update(natural_loss=losses.natural_cross_entropy(logits, labels),
                   robust_loss=losses.robust_cross_entropy(margins), eps=lt.eps(state.step),
                   linf_p=jnp.minimum(p, 1e6),   # ∞ shown as 1e6 in the logs
                   train_certified=jnp.mean(ibp.certified(margins, labels)), deq={})
  elif not kind.bounds:
    logits, cols = model.apply(variables, x, train=True, mutable=['batch_stats', 'deq_stats'])
    loss = losses.natural_cross_entropy(logits, labels)
    metrics['deq'] = deq_summary(sown(cols.get('deq_stats'), 'nominal'))
  else:
    eps = cfg.epsilon(state.step)
    # The warm-up's bounds at ε = 0 would be points: take them at a tiny ε.
    box = linf_ball(x, eps if kind.certified else cfg.reg_min_eps, cfg.mean, cfg.std)
    mutable = ['batch_stats', 'deq_stats'] + (['preactivations'] if kind.regularised else [])
    if kind.crown:
      bounds, cols = crown.clean_and_bounds(model, variables, x, box, labels, True, mutable)
      beta = cfg.beta(state.step)
      logits, margins = bounds.logits, crown.mixed_margins(bounds, beta)
      metrics.update(crown_beta=beta, crown_gain=jnp.mean(bounds.crown - bounds.ibp))
    else:
      (logits, margins), cols = clean_and_bounds(model, variables, x, box, labels, train=True,
                                                 mutable=mutable)
    natural = losses.natural_cross_entropy(logits, labels)
    robust = losses.robust_cross_entropy(margins)
    if not kind.certified:
      loss = natural
    elif cfg.loss == 'mixed':
      loss = losses.mixed_loss(natural, robust, cfg.kappa(state.step))
    else:
      loss = robust
    metrics.update(natural_loss=natural, robust_loss=robust, eps=eps,
                   train_certified=jnp.mean(ibp.certified(margins, labels)))
    if kind.regularised:
      pre = sown(cols.get('preactivations'))
      tightness = losses.tightness_regulariser(box, pre, cfg.reg_tau)
      balance = losses.relu_balance_regulariser(pre, cfg.reg_tau)
      loss = loss + losses.warmup_weight(eps, cfg.eps, cfg.reg_lambda) * (tightness + balance)
      metrics.update(regulariser=tightness + balance, reg_tightness=tightness,
                     reg_relu_balance=balance)
    metrics['deq'] = deq_summary(sown(cols.get('deq_stats'), 'interval'))
  metrics['train_accuracy'] = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics['loss'] = loss
  return loss, (cols['batch_stats'], metrics)


def train_step(state: TrainState, batch, *, model: nn.Module, tx: optax.GradientTransformation,
               cfg: CertifiedTraining, kind: StepKind):
  """One optimiser step; ``kind`` (static) selects natural / bound loss and
  the warm-up regularisers (`CertifiedTraining.step_kind`)."""
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
  with policy.layers(cfg.precision):  # traced here: the forward and its VJPs
    (_, (batch_stats, metrics)), grads = grad_fn(state.params, state, batch, model, cfg, kind)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  spectral = state.spectral
  if cfg.parametrization is not None:
    params, spectral = parametrize.project_tree(params, spectral, cfg.parametrization)
  metrics['grad_norm'] = optax.global_norm(grads)
  deq = metrics.pop('deq')
  metrics.update(deq)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       spectral=spectral, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch, key, *, model: nn.Module, cfg: CertifiedTraining,
              eps: float, pgd_steps: int = 10, pgd_restarts: int = 1,
              verifier: str | None = None, crown_max_neurons: int | None = None) -> dict:
  """Sums over the real (``mask``) examples of a batch: ``count``,
  ``correct``, ``certified`` (sound bounds: margins > 0 for every j != y, every
  DEQ solve certifiable), ``pgd_robust`` (no PGD point misclassified), and
  interval-solver statistics.

  ``verifier`` (one of `VERIFIERS`) adds ``certified_crown``: certified by IBP
  *or* by CROWN(-IBP) (both are sound; neither dominates), with CROWN
  intermediate bounds for layers of at most ``crown_max_neurons`` neurons
  ('crown'). A DEQ is then a cut: IBP through it, CROWN after it.

  Every product at ``HIGHEST``, whatever ``cfg.precision`` says."""
  with policy.layers(policy.HIGHEST):
    return _eval_sums(state, batch, key, model, cfg, eps, pgd_steps, pgd_restarts, verifier,
                      crown_max_neurons)


def _eval_sums(state, batch, key, model, cfg, eps, pgd_steps, pgd_restarts, verifier,
               crown_max_neurons) -> dict:
  x, labels, mask = batch['image'], batch['label'], batch['mask']
  variables = state.variables()
  box = linf_ball(x, eps, cfg.mean, cfg.std)
  if verifier is None:
    (logits, margins), cols = clean_and_bounds(model, variables, x, box, labels, train=False,
                                               mutable=['deq_stats'])
  else:
    bounds, cols = crown.clean_and_bounds(
        model, variables, x, box, labels, False, ['deq_stats'],
        'crown' if verifier == 'crown' else 'ibp', crown_max_neurons)
    logits, margins = bounds.logits, bounds.ibp
  correct = jnp.argmax(logits, -1) == labels
  # NaN margins (infinite bounds of a non-certifiable DEQ solve) do not certify.
  certified = correct & ibp.certified(margins, labels)
  interval_stats = sown(cols.get('deq_stats'), 'interval')
  for s in interval_stats:
    certified = certified & s.certifiable
  if verifier is not None:
    certified_crown = certified | (correct & ibp.certified(bounds.crown, labels))
    for s in interval_stats:
      certified_crown = certified_crown & s.certifiable
  logits_fn = lambda z: model.apply(variables, z, train=False)
  _, broken = attacks.pgd(logits_fn, x, labels, box, key, pgd_steps, pgd_restarts)
  pgd_robust = correct & ~broken
  m = mask.astype(jnp.float32)
  out = {'count': jnp.sum(m), 'correct': jnp.sum(m * correct),
         'certified': jnp.sum(m * certified), 'pgd_robust': jnp.sum(m * pgd_robust),
         # A certified sample that PGD breaks would mean unsound bounds.
         'certified_but_broken': jnp.sum(m * (certified & broken))}
  if verifier is not None:
    out.update(certified_crown=jnp.sum(m * certified_crown),
               certified_but_broken=jnp.sum(m * (certified_crown & broken)))
  if interval_stats:
    it = jnp.stack([s.iterations for s in interval_stats]).astype(jnp.float32)
    out.update(deq_iterations_sum=jnp.sum(m * jnp.mean(it, 0)),
               deq_iterations_max=jnp.max(jnp.where(mask, jnp.max(it, 0), 0)),
               deq_converged=jnp.sum(m * jnp.all(jnp.stack([s.converged for s in interval_stats]), 0)),
               deq_residual_max=jnp.max(jnp.where(mask, jnp.max(jnp.stack([s.residual for s in interval_stats]), 0), 0)),
               deq_lipschitz=jnp.max(jnp.stack([s.lipschitz for s in interval_stats])))
  return out


# --- devices -------------------------------------------------------------

def make_mesh(devices=None) -> Mesh:
  """1-D mesh ``('data',)`` over all devices of all processes (Auto axis type:
  shardings inside the step are left to the compiler)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (DATA_AXIS,))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles each process's slice of a batch into global sharded arrays."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(mesh: Mesh, tree):
  return jax.device_put(tree, NamedSharding(mesh, P()))


class Steps:
  """The jit-compiled train and eval steps of a model on a mesh."""

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation, cfg: CertifiedTraining,
               mesh: Mesh, pgd_steps: int = 10, pgd_restarts: int = 1,
               verifier: str | None = None, crown_max_neurons: int | None = None):
    if verifier is not None and verifier not in VERIFIERS:
      raise ValueError(f'verifier must be None or one of {VERIFIERS}, got {verifier!r}.')
    self.cfg, self.mesh = cfg, mesh
    self._model, self._tx = model, tx
    data = NamedSharding(mesh, P(DATA_AXIS))
    repl = NamedSharding(mesh, P())
    self._train_shardings = dict(in_shardings=(repl, data), out_shardings=(repl, repl))
    self._train: dict[StepKind, Any] = {}
    self._eval = jax.jit(
        lambda s, b, k, eps: eval_step(s, b, k, model=model, cfg=cfg, eps=eps,
                                       pgd_steps=pgd_steps, pgd_restarts=pgd_restarts,
                                       verifier=verifier, crown_max_neurons=crown_max_neurons),
        in_shardings=(repl, data, repl, repl), out_shardings=repl)

  def compiled_train(self, kind: StepKind):
    """The jitted train step of ``kind`` (built on first use: a run compiles
    only the kinds its schedule reaches)."""
    if kind not in self._train:
      fn = lambda s, b: train_step(s, b, model=self._model, tx=self._tx, cfg=self.cfg, kind=kind)
      self._train[kind] = jax.jit(fn, donate_argnums=0, **self._train_shardings)
    return self._train[kind]

  def train(self, state: TrainState, local_batch: dict, step: int):
    """``step`` is the host's copy of ``state.step`` (no device sync needed)."""
    return self.compiled_train(self.cfg.step_kind(step))(
        state, global_batch(self.mesh, local_batch))

  def evaluate(self, state: TrainState, local_batch: dict, key, eps: float) -> dict:
    return self._eval(state, global_batch(self.mesh, local_batch), key,
                      jnp.asarray(eps, jnp.float32))
