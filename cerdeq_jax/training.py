"""Certified training and evaluation steps, jit-compiled over a device mesh.

The batch is sharded over a 1-D ``Mesh`` axis ``'data'`` (all devices of all
processes); parameters and optimiser state are replicated. BatchNorm moments
are plain means over the (global) batch axis, so under ``jit`` they are taken
over the global batch. The parametrisation's projection (Björck / WN / SN) is
applied after the optimiser update, inside the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cerdeq_jax import attacks, ibp, losses, parametrize, schedules
from cerdeq_jax.interval import Interval, linf_ball
from cerdeq_jax.layers import BATCH_MOMENTS, SPECTRAL

DATA_AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class CertifiedTraining:
  """What a certified train step needs to know (static under ``jit``).

  eps: target radius in [0, 1] pixel units; mean/std: per-channel
  normalisation; the ε schedule is per batch: 0 for ``eps_start_epochs``,
  smooth ramp over ``eps_length_epochs``, then ``eps``. ``loss`` is
  ``'fast_ibp'`` (natural loss while ε = 0, then the pure IBP loss) or
  ``'mixed'`` (``κ·CE_nat + (1-κ)·CE_rob``, κ from ``kappa_start`` to
  ``kappa_end`` over the ramp). ``reg_lambda`` weighs the Fast-IBP warm-up
  regularisers (0 disables them).
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
  parametrization: parametrize.Parametrization | None = None

  def __post_init__(self):
    if not np.isfinite(self.eps) or self.eps < 0:
      raise ValueError(f'eps must be a finite number >= 0, got {self.eps}.')
    if self.loss not in ('fast_ibp', 'mixed'):
      raise ValueError(f"loss must be 'fast_ibp' or 'mixed', got {self.loss!r}.")

  def epsilon(self, step):
    return schedules.epsilon(step, self.eps, self.steps_per_epoch,
                             self.eps_start_epochs, self.eps_length_epochs)

  def kappa(self, step):
    return schedules.kappa(step, self.steps_per_epoch, self.eps_start_epochs,
                           self.eps_length_epochs, self.kappa_start, self.kappa_end)

  def is_certified_step(self, step: int) -> bool:
    """Host-side: whether ``step`` trains on bounds (ε > 0)."""
    return float(self.epsilon(step)) > 0


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


def _loss_fn(params, state: TrainState, batch, model, cfg: CertifiedTraining, certified: bool):
  x, labels = batch['image'], batch['label']
  variables = state.variables(params)
  metrics = {}
  if not certified:
    logits, cols = model.apply(variables, x, train=True, mutable=['batch_stats', 'deq_stats'])
    loss = losses.natural_cross_entropy(logits, labels)
    metrics['deq'] = deq_summary(sown(cols.get('deq_stats'), 'nominal'))
  else:
    eps = cfg.epsilon(state.step)
    box = linf_ball(x, eps, cfg.mean, cfg.std)
    (logits, margins), cols = clean_and_bounds(
        model, variables, x, box, labels, train=True,
        mutable=['batch_stats', 'preactivations', 'deq_stats'])
    natural = losses.natural_cross_entropy(logits, labels)
    robust = losses.robust_cross_entropy(margins)
    if cfg.loss == 'mixed':
      loss = losses.mixed_loss(natural, robust, cfg.kappa(state.step))
    else:
      loss = robust
    metrics.update(natural_loss=natural, robust_loss=robust, eps=eps,
                   train_certified=jnp.mean(ibp.certified(margins, labels)))
    if cfg.reg_lambda > 0:
      pre = sown(cols.get('preactivations'))
      reg = (losses.tightness_regulariser(box, pre, cfg.reg_tau)
             + losses.relu_balance_regulariser(pre, cfg.reg_tau))
      weight = losses.warmup_weight(eps, max(cfg.eps, 1e-12), cfg.reg_lambda)
      loss = loss + weight * reg
      metrics['regulariser'] = reg
    metrics['deq'] = deq_summary(sown(cols.get('deq_stats'), 'interval'))
  metrics['train_accuracy'] = jnp.mean(jnp.argmax(logits, -1) == labels)
  metrics['loss'] = loss
  return loss, (cols['batch_stats'], metrics)


def train_step(state: TrainState, batch, *, model: nn.Module, tx: optax.GradientTransformation,
               cfg: CertifiedTraining, certified: bool):
  """One optimiser step; ``certified`` (static) selects the bound loss."""
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
  (_, (batch_stats, metrics)), grads = grad_fn(state.params, state, batch, model, cfg, certified)
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
              eps: float, pgd_steps: int = 10, pgd_restarts: int = 1) -> dict:
  """Sums over the real (``mask``) examples of a batch: ``count``,
  ``correct``, ``certified`` (sound bounds: margins > 0 for every j != y, every
  DEQ solve certifiable), ``pgd_robust`` (no PGD point misclassified), and
  interval-solver statistics."""
  x, labels, mask = batch['image'], batch['label'], batch['mask']
  variables = state.variables()
  box = linf_ball(x, eps, cfg.mean, cfg.std)
  (logits, margins), cols = clean_and_bounds(model, variables, x, box, labels, train=False,
                                             mutable=['deq_stats'])
  correct = jnp.argmax(logits, -1) == labels
  # NaN margins (infinite bounds of a non-certifiable DEQ solve) do not certify.
  certified = correct & ibp.certified(margins, labels)
  interval_stats = sown(cols.get('deq_stats'), 'interval')
  for s in interval_stats:
    certified = certified & s.certifiable
  logits_fn = lambda z: model.apply(variables, z, train=False)
  _, broken = attacks.pgd(logits_fn, x, labels, box, key, pgd_steps, pgd_restarts)
  pgd_robust = correct & ~broken
  m = mask.astype(jnp.float32)
  out = {'count': jnp.sum(m), 'correct': jnp.sum(m * correct),
         'certified': jnp.sum(m * certified), 'pgd_robust': jnp.sum(m * pgd_robust),
         # A certified sample that PGD breaks would mean unsound bounds.
         'certified_but_broken': jnp.sum(m * (certified & broken))}
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
               mesh: Mesh, pgd_steps: int = 10, pgd_restarts: int = 1):
    self.cfg, self.mesh = cfg, mesh
    data = NamedSharding(mesh, P(DATA_AXIS))
    repl = NamedSharding(mesh, P())

    def compile_train(certified):
      fn = lambda s, b: train_step(s, b, model=model, tx=tx, cfg=cfg, certified=certified)
      return jax.jit(fn, in_shardings=(repl, data), out_shardings=(repl, repl),
                     donate_argnums=0)

    self._train = {False: compile_train(False), True: compile_train(True)}
    self._eval = jax.jit(
        lambda s, b, k, eps: eval_step(s, b, k, model=model, cfg=cfg, eps=eps,
                                       pgd_steps=pgd_steps, pgd_restarts=pgd_restarts),
        in_shardings=(repl, data, repl, repl), out_shardings=repl)

  def train(self, state: TrainState, local_batch: dict, step: int):
    """``step`` is the host's copy of ``state.step`` (no device sync needed)."""
    certified = self.cfg.is_certified_step(step)
    return self._train[certified](state, global_batch(self.mesh, local_batch))

  def evaluate(self, state: TrainState, local_batch: dict, key, eps: float) -> dict:
    return self._eval(state, global_batch(self.mesh, local_batch), key,
                      jnp.asarray(eps, jnp.float32))
