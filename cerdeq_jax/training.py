"""Certified training and evaluation steps, jit-compiled over a device mesh
(what a step needs to know, `CertifiedTraining` and `StepKind`, lives in
`cerdeq_jax.recipe` and is re-exported here).

The batch is sharded over a 1-D ``Mesh`` axis ``'data'`` (all devices of all
processes); parameters and optimiser state are replicated. BatchNorm moments
are plain means over the (global) batch axis, so under ``jit`` they are taken
over the global batch. The steps are traced with the mesh in context
(``use_abstract_mesh``), so each device runs the DEQ solver loops on its own
slice of the batch (`cerdeq_jax.implicit`). The parametrisation's projection
(Björck / WN / SN) is applied after the optimiser update, inside the step.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cerdeq_jax import attacks, crown, host_memory, ibp, losses, parametrize
from cerdeq_jax import precision as policy
from cerdeq_jax.interval import Interval, linf_ball
from cerdeq_jax.layers import SPECTRAL, clean_pass_collections
from cerdeq_jax.recipe import METHODS, VERIFIERS, CertifiedTraining, StepKind  # noqa: F401

DATA_AXIS = 'data'


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
  BatchNorm in training bounds with the clean batch's moments, and each DEQ
  starts its bound solve at its clean fixed point: `layers.clean_pass_collections`).

  Returns ``((logits, margins), collections)``; margins are the lower bounds of
  ``logit_y - logit_j``.
  """
  def both(module, x, box, labels):
    return module(x, train=train), module(box, train=train, labels=labels)
  return model.apply(variables, x, box, labels, method=both,
                     mutable=list(mutable) + clean_pass_collections(train))


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
  metrics['grad_norm'] = optax.tree.norm(grads)
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
    stacked = lambda field: jnp.stack([getattr(s, field) for s in interval_stats])
    it = stacked('iterations').astype(jnp.float32)
    out.update(deq_iterations_sum=jnp.sum(m * jnp.mean(it, 0)),
               deq_iterations_max=jnp.max(jnp.where(mask, jnp.max(it, 0), 0)),
               deq_converged=jnp.sum(m * jnp.all(stacked('converged'), 0)),
               deq_residual_max=jnp.max(jnp.where(mask, jnp.max(stacked('residual'), 0), 0)),
               deq_lipschitz=jnp.max(stacked('lipschitz')))
  return out


# --- devices -------------------------------------------------------------

def make_mesh(devices=None) -> Mesh:
  """1-D mesh ``('data',)`` over all devices of all processes (Auto axis type:
  shardings inside the step are left to the compiler)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (DATA_AXIS,))


def _automatic(mesh: Mesh) -> Mesh:
  """``mesh`` with automatic axes, what the steps are written for (one from
  ``jax.make_mesh`` has explicit ones); the batch goes on ``'data'``."""
  if DATA_AXIS not in mesh.axis_names:
    raise ValueError(f"The mesh needs a '{DATA_AXIS}' axis for the batch; it has "
                     f'{mesh.axis_names} (training.make_mesh() makes one).')
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles each process's slice of a batch into global sharded arrays."""
  sharding = NamedSharding(_automatic(mesh), P(DATA_AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def replicate(mesh: Mesh, tree):
  return jax.device_put(tree, NamedSharding(_automatic(mesh), P()))


class Steps:
  """The jit-compiled train and eval steps of a model on a mesh (any mesh with
  a ``'data'`` axis, its axes made automatic); ``eval_model`` (default
  ``model``: the same parameters, e.g. with tighter DEQ solves) evaluates.

  `train` and `evaluate` compile a step on its first call and then return the
  compiler's freed heap to the system (`host_memory`: ~350 MB of resident
  memory for the CIFAR-10 CerDEQ on the CPU)."""

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation, cfg: CertifiedTraining,
               mesh: Mesh, pgd_steps: int = 10, pgd_restarts: int = 1,
               verifier: str | None = None, crown_max_neurons: int | None = None,
               eval_model: nn.Module | None = None):
    if verifier is not None and verifier not in VERIFIERS:
      raise ValueError(f'verifier must be None or one of {VERIFIERS}, got {verifier!r}.')
    mesh = _automatic(mesh)
    self.cfg, self.mesh = cfg, mesh
    self._model, self._tx = model, tx
    data = NamedSharding(mesh, P(DATA_AXIS))
    repl = NamedSharding(mesh, P())
    self._train_shardings = dict(in_shardings=(repl, data), out_shardings=(repl, repl))
    self._train: dict[StepKind, Any] = {}
    self._called: set = set()   # step kinds (and 'eval') that have compiled
    self._eval = jax.jit(
        self._on_mesh(lambda s, b, k, eps: eval_step(
            s, b, k, model=model if eval_model is None else eval_model, cfg=cfg, eps=eps,
            pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, verifier=verifier,
            crown_max_neurons=crown_max_neurons)),
        in_shardings=(repl, data, repl, repl), out_shardings=repl)

  def _on_mesh(self, fn):
    """``fn`` traced with the mesh in context: the DEQ solver loops then run
    per device (`cerdeq_jax.implicit`), with no collective inside them."""
    def traced(*args):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        return fn(*args)
    return traced

  def compiled_train(self, kind: StepKind):
    """The jitted train step of ``kind`` (built on first use: a run compiles
    only the kinds its schedule reaches)."""
    if kind not in self._train:
      fn = lambda s, b: train_step(s, b, model=self._model, tx=self._tx, cfg=self.cfg, kind=kind)
      self._train[kind] = jax.jit(self._on_mesh(fn), donate_argnums=0, **self._train_shardings)
    return self._train[kind]

  def compiled_eval(self):
    """The jitted eval step, ``(state, global batch, key, eps) -> sums``
    (`eval_step`), e.g. to lower and inspect it."""
    return self._eval

  def train(self, state: TrainState, local_batch: dict, step: int):
    """``step`` is the host's copy of ``state.step`` (no device sync needed)."""
    kind = self.cfg.step_kind(step)
    out = self.compiled_train(kind)(state, global_batch(self.mesh, local_batch))
    self._after_call(kind)
    return out

  def evaluate(self, state: TrainState, local_batch: dict, key, eps: float) -> dict:
    out = self._eval(state, global_batch(self.mesh, local_batch), key,
                     jnp.asarray(eps, jnp.float32))
    self._after_call('eval')
    return out

  def _after_call(self, step_kind):
    if step_kind not in self._called:  # the call compiled it
      self._called.add(step_kind)
      host_memory.release_freed_heap()
