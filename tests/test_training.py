"""Certified train/eval steps: sharding, multi-process, BatchNorm, projection,
the eval invariants, the ε schedule.

The training runs happen in subprocesses (`helpers_training.worker`), started
together by the module fixture ``runs`` so that they share the two cores:

* ``ref``: 1 device, 60 steps of a tiny CerDEQ on the quadrant data (steps
  0-4 the ε = 0 warm-up: natural loss + regularisers on bounds at ε = 1e-6;
  5-8 on the ε ramp, regularised through step 7; then ε = 0.1), snapshot
  after 7 steps, then the evaluation and the strong-PGD check;
* ``sharded``: the first 7 steps on 8 forced CPU devices, then the compiled
  train and eval programs read for collectives inside loops;
* ``multi``: the first 7 steps as 2 processes (1 CPU device each) through
  `jax.distributed`, each feeding its half of every global batch;
* ``wn`` / ``sn``: 3 steps of the DEQ+WN / DEQ+SN ablations.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import helpers_training as h

SNAPSHOT = 7           # 5 warm-up steps (0-4) and 2 certified ones (5, 6), all regularised
REF_STEPS = 60
EPS = 0.1
# Evaluation radii: the training one, one where only part is certified, and
# one where the strong attack must break nearly everything.
EVAL_EPS = [EPS, 0.2, 0.5]
RTOL, ATOL = 1e-4, 1e-5
LR = 1e-2
# Parameters of runs that differ only in rounding (another batch split): the
# DEQ solves stop at a relative residual of 1e-3 (`helpers_training.model`), so
# fixed points and gradients may differ by ~1e-3 relative, and each of Adam's
# normalised steps by ~1e-3 * LR; over SNAPSHOT steps at most this much. (The
# biases in front of BatchNorm, whose gradient is rounding noise, move by ~4e-6.)
# A wrong split moves them by ~LR a step (and they move by > 1e-2 in all).
PARAMS_ATOL = SNAPSHOT * LR * 1e-3


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('training_runs')
  cache = str(tmp / 'compilation_cache')
  port = h.free_port()
  procs = {
      'ref': h.start_worker(dict(model='cerdeq', steps=REF_STEPS, snapshot=SNAPSHOT,
                                 evaluate=True, eval_eps=EVAL_EPS, eps=EPS, lr=LR,
                                 out=str(tmp / 'ref.npz')),
                            h.subprocess_env(cache)),
      'sharded': h.start_worker(dict(model='cerdeq', steps=SNAPSHOT, eps=EPS, lr=LR,
                                     hlo_check=True, out=str(tmp / 'sharded.npz')),
                                h.subprocess_env(cache, devices=8)),
  }
  for i in range(2):
    procs[f'multi{i}'] = h.start_worker(
        dict(model='cerdeq', steps=SNAPSHOT, eps=EPS, lr=LR, out=str(tmp / 'multi.npz'),
             coordinator=f'localhost:{port}', num_processes=2, process_id=i),
        h.subprocess_env(cache))
  for name in ('wn', 'sn'):
    procs[name] = h.start_worker(dict(model=f'deq_{name}', steps=3, eps=0.0, lr=LR,
                                      out=str(tmp / f'{name}.npz')), h.subprocess_env(cache))
  logs, errors = {}, []
  for name, proc in procs.items():
    try:
      logs[name] = h.finish_worker(proc, timeout=500)
    except AssertionError as e:
      errors.append(f'{name}: {e}')
  outputs = {}
  for name, path in [('ref', 'ref.npz'), ('sharded', 'sharded.npz'), ('multi0', 'multi.0.npz'),
                     ('multi1', 'multi.1.npz'), ('wn', 'wn.npz'), ('sn', 'sn.npz')]:
    if (tmp / path).exists():
      outputs[name] = h.load_npz(str(tmp / path))
  outputs['_errors'] = errors
  for name, log in logs.items():  # shown with -s: where the time goes
    print(name, '|', ' | '.join(l for l in log.splitlines() if 'step' not in l))
  return outputs


def _get(runs, name):
  if name not in runs:
    pytest.fail(f'run {name!r} failed:\n' + '\n'.join(runs['_errors']))
  return runs[name]


def _snapshot(ref, prefix):
  return {k.replace(f'snap_{prefix}/', f'{prefix}/'): v for k, v in ref.items()
          if k.startswith(f'snap_{prefix}/')}


# --- cheap, in-process ---------------------------------------------------------

@pytest.mark.parametrize('eps', [-0.1, float('nan'), float('inf'), -float('inf')])
def test_certified_training_rejects_bad_eps(eps):
  from cerdeq_jax import training
  with pytest.raises(ValueError, match='eps'):
    training.CertifiedTraining(eps=eps, mean=(0.,), std=(1.,), steps_per_epoch=1)


def test_certified_training_rejects_unknown_loss():
  from cerdeq_jax import training
  with pytest.raises(ValueError, match='loss'):
    training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=1, loss='pgd')
  # The valid ones are accepted.
  for loss in ('fast_ibp', 'mixed'):
    training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=1, loss=loss)


def test_step_kind_follows_the_published_schedule():
  """spe 3, start 1, length 2 (published ``start=2,length=2``): ε = 0 up to
  step 3 included -> warm-up steps (natural loss + regularisers); steps 4-8
  (epochs 1-2) certified + regularisers (``t <= start + length - 1``); from
  step 9 certified only. A pure function of the step."""
  from cerdeq_jax import training
  cfg = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=3,
                                   eps_start_epochs=1, eps_length_epochs=2)
  kinds = [cfg.step_kind(s) for s in range(12)]
  warm, ramp, plain = (training.StepKind(False, True), training.StepKind(True, True),
                       training.StepKind(True, False))
  assert kinds == [warm] * 4 + [ramp] * 5 + [plain] * 3
  assert [cfg.step_kind(s) for s in reversed(range(12))] == kinds[::-1]
  assert warm.bounds and ramp.bounds and plain.bounds
  # No regulariser: the plain natural step (no bounds) while ε = 0.
  off = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=3,
                                   eps_start_epochs=1, eps_length_epochs=2, reg_lambda=0.0)
  assert [off.step_kind(s) for s in (0, 3, 4, 9)] == [
      training.StepKind(False, False), training.StepKind(False, False),
      training.StepKind(True, False), training.StepKind(True, False)]
  assert not off.step_kind(0).bounds
  # ε = 0 runs are natural throughout.
  nat = training.CertifiedTraining(eps=0.0, mean=(0.,), std=(1.,), steps_per_epoch=3)
  assert {nat.step_kind(s) for s in range(0, 200, 7)} == {training.StepKind(False, False)}


class _DenseBN:
  """flatten -> dense 5 -> BatchNorm -> ReLU -> elided dense 3, and the same
  network's losses in float64 NumPy from the definitions (clean-batch BN
  moments for the bounds; IBP by centre/radius)."""
  MEAN, STD = (0.2,), (0.3,)

  @staticmethod
  def module():
    import flax.linen as nn
    from cerdeq_jax import layers

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train=False, labels=None):
        x = layers.Dense(5)(layers.Flatten()(x))
        x = layers.ReLU()(layers.BatchNorm(use_running_average=not train)(x))
        return layers.ElidedDense(3)(x, labels)
    return Net()

  @classmethod
  def losses(cls, params, x, labels, eps, tau=0.5):
    """``(natural CE, robust CE, tightness + ReLU balance)`` at bound radius ``eps``."""
    from test_losses import _balance_reference
    f64 = lambda a: np.asarray(a, np.float64)
    p = {k: {n: f64(v) for n, v in d.items()} for k, d in params.items()}
    w1, b1 = p['Dense_0']['kernel'], p['Dense_0']['bias']
    g, beta = p['BatchNorm_0']['scale'], p['BatchNorm_0']['bias']
    w2, b2 = p['ElidedDense_0']['kernel'], p['ElidedDense_0']['bias']
    n = x.shape[0]
    x = f64(x).reshape(n, -1)
    mean, std = cls.MEAN[0], cls.STD[0]
    lo = np.maximum(x - eps / std, (0 - mean) / std)   # the ball, clipped to [0, 1] pixels
    hi = np.minimum(x + eps / std, (1 - mean) / std)
    h = x @ w1 + b1
    mu, var = h.mean(0), h.var(0)                       # clean batch, biased
    mul = g / np.sqrt(var + 1e-5)
    logits = np.maximum(mul * (h - mu) + beta, 0) @ w2 + b2
    ce = lambda z, y: np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(n), y])
    pre_c = mul * ((lo + hi) / 2 @ w1 + b1 - mu) + beta
    pre_r = np.abs(mul) * ((hi - lo) / 2 @ np.abs(w1))
    zl, zu = np.maximum(pre_c - pre_r, 0), np.maximum(pre_c + pre_r, 0)
    margins = np.zeros((n, 3))
    for i, y in enumerate(labels):
      for j in range(3):
        c = w2[:, y] - w2[:, j]
        margins[i, j] = np.maximum(c, 0) @ zl[i] + np.minimum(c, 0) @ zu[i] + b2[y] - b2[j]
    robust = np.mean(np.log(np.exp(-margins).sum(1)))
    tight = max(tau - np.mean((hi - lo) / 2) / np.mean(pre_r), 0) / tau
    balance = _balance_reference(pre_c - pre_r, pre_c + pre_r, tau) or 0.0
    return ce(logits, labels), robust, tight + balance


def test_steps_take_a_mesh_from_jax_make_mesh():
  """`Steps` on a ``jax.make_mesh`` mesh (explicit axes, jax's default) trains
  and evaluates as on `training.make_mesh` (automatic axes): the elided
  classifier's label gather has no explicit-sharding rule, so the steps make
  the axes automatic. A mesh without a 'data' axis is a one-line error."""
  import jax
  import optax
  from cerdeq_jax import training
  net = _DenseBN.module()
  cfg = training.CertifiedTraining(eps=0.1, mean=_DenseBN.MEAN, std=_DenseBN.STD,
                                   steps_per_epoch=1, eps_start_epochs=0, eps_length_epochs=1)
  rng = np.random.default_rng(0)
  x = ((rng.uniform(0.0, 1.0, (8, 2, 2, 1)) - 0.2) / 0.3).astype(np.float32)
  batch = {'image': x, 'label': rng.integers(0, 3, 8).astype(np.int32),
           'mask': np.ones(8, bool)}
  tx = optax.adam(1e-2)
  results = []
  for mesh in (training.make_mesh(), jax.make_mesh((jax.device_count(),), ('data',))):
    steps = training.Steps(net, tx, cfg, mesh)
    state = training.replicate(mesh, training.init_state(net, tx, jax.random.PRNGKey(1), x[:1]))
    state, metrics = steps.train(state, batch, 1)
    sums = steps.evaluate(state, batch, jax.random.PRNGKey(2), 0.1)
    results.append((jax.device_get(state.params), float(metrics['loss']),
                    {k: float(v) for k, v in sums.items()}))
  assert 'Explicit' in str(jax.make_mesh((1,), ('data',)).axis_types)
  (auto_params, auto_loss, auto_sums), (params, loss, sums) = results
  assert loss == pytest.approx(auto_loss, rel=1e-6) and sums == pytest.approx(auto_sums)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         params, auto_params)
  with pytest.raises(ValueError, match="'data' axis"):
    training.Steps(net, tx, cfg, jax.make_mesh((1,), ('batch',)))


def test_certified_step_starts_the_interval_solve_at_the_clean_fixed_point():
  """A certified train step hands each DEQ's clean fixed point to its interval
  solve (`layers.DEQ_START`): at ε = 0 the box is the clean batch, so that
  solve needs no iteration; evaluation starts it from zeros."""
  import jax
  import optax
  from cerdeq_jax import models, training
  from cerdeq_jax.interval import Interval
  net = models.create('cerdeq', 3, image_size=8, width=4, dense=8)
  cfg = training.CertifiedTraining(eps=0.1, mean=(0.5,) * 3, std=(0.25,) * 3,
                                   steps_per_epoch=1, eps_start_epochs=1, eps_length_epochs=1)
  rng = np.random.default_rng(0)
  x = ((rng.uniform(0.0, 1.0, (4, 8, 8, 3)) - 0.5) / 0.25).astype(np.float32)
  batch = {'image': x, 'label': rng.integers(0, 3, 4).astype(np.int32)}
  tx = optax.sgd(0.0)
  state = training.init_state(net, tx, jax.random.PRNGKey(0), x[:1])
  assert float(cfg.epsilon(0)) == 0.0
  _, metrics = jax.jit(lambda s, b: training.train_step(
      s, b, model=net, tx=tx, cfg=cfg, kind=training.StepKind(True, False)))(state, batch)
  assert float(metrics['deq_iterations']) == 0.0 and float(metrics['deq_converged']) == 1.0
  point = Interval(jax.numpy.asarray(x), jax.numpy.asarray(x))
  _, cols = training.clean_and_bounds(net, state.variables(), x, point, batch['label'],
                                      train=False, mutable=['deq_stats'])
  assert np.all(np.asarray(cols['deq_stats']['deq']['interval'][0].iterations) > 0)


@pytest.mark.parametrize('loss', ['fast_ibp', 'mixed'])
def test_train_step_loss_of_each_step_kind(loss):
  """The loss each compiled step minimises, against `_DenseBN.losses`:
  warm-up (step 0, ε = 0): CE_nat + λ·reg, reg on bounds at ε = 1e-6;
  ramp (step 4): CE_rob(ε) (or κ-mixed) + λ(1 - ε/ε_max)·reg(ε);
  after the regularised epochs (step 9): CE_rob(ε_max) (or κ-mixed)."""
  import jax
  import jax.numpy as jnp
  import optax
  from cerdeq_jax import training
  net, lam, eps_max = _DenseBN.module(), 0.5, 0.1
  cfg = training.CertifiedTraining(eps=eps_max, mean=_DenseBN.MEAN, std=_DenseBN.STD,
                                   steps_per_epoch=3, eps_start_epochs=1, eps_length_epochs=2,
                                   loss=loss, reg_lambda=lam)
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0.0, 1.0, (8, 2, 2, 1))
  x = jnp.asarray((pixels - 0.2) / 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
  tx = optax.sgd(0.0)
  state = training.init_state(net, tx, jax.random.PRNGKey(1), x[:1])
  # BN scale 3 (bounds 3x wider than at init: the tightness hinge is on) and
  # bias -0.5 (mostly inactive units: the balance term is on).
  bn = {'scale': jnp.full((5,), 3.0), 'bias': jnp.full((5,), -0.5)}
  state = state.replace(params={**state.params, 'BatchNorm_0': bn})
  params = jax.device_get(state.params)
  batch = {'image': x, 'label': labels}
  regs = []
  for step in (0, 4, 9):
    kind = cfg.step_kind(step)
    run = jax.jit(lambda s, b, kind=kind: training.train_step(s, b, model=net, tx=tx, cfg=cfg,
                                                              kind=kind))
    _, m = run(state.replace(step=jnp.asarray(step, jnp.int32)), batch)
    eps = float(cfg.epsilon(step))
    natural, robust, reg = _DenseBN.losses(params, np.asarray(x), np.asarray(labels),
                                           eps if kind.certified else 1e-6)
    kappa = float(cfg.kappa(step))
    main = natural if not kind.certified else (
        robust if loss == 'fast_ibp' else kappa * natural + (1 - kappa) * robust)
    np.testing.assert_allclose(float(m['eps']), eps, rtol=1e-6)
    got_reg = float(m['regulariser']) if kind.regularised else 0.0
    weight = lam * (1 - eps / eps_max) if kind.regularised else 0.0
    np.testing.assert_allclose(float(m['loss']), main + weight * got_reg, rtol=2e-5,
                               err_msg=f'step {step}')
    if kind.regularised:
      # Float32 bounds 2e-6 wide around O(1) values carry ~1e-7 of rounding,
      # i.e. ~1 % of their radius (as in any float32 IBP): the warm-up's
      # regulariser agrees with the float64 reference to that.
      np.testing.assert_allclose(got_reg, reg, rtol=2e-5 if kind.certified else 2e-2,
                                 err_msg=f'step {step}')
      regs.append(reg)
  assert min(regs) > 0.1, regs  # both regularised steps exercise the terms
  # The warm-up's bound radius is `reg_min_eps` (ratios hardly depend on it at
  # 1e-6, so check it at a radius where they do): bounds and regulariser there.
  wide = dataclasses.replace(cfg, reg_min_eps=0.05)
  kind = wide.step_kind(0)
  _, m = jax.jit(lambda s, b: training.train_step(s, b, model=net, tx=tx, cfg=wide,
                                                  kind=kind))(state, batch)
  natural, robust, reg = _DenseBN.losses(params, np.asarray(x), np.asarray(labels), 0.05)
  np.testing.assert_allclose(float(m['robust_loss']), robust, rtol=2e-5)
  np.testing.assert_allclose(float(m['regulariser']), reg, rtol=2e-5)
  np.testing.assert_allclose(float(m['loss']), natural + lam * reg, rtol=2e-5)
  assert robust > natural + 1e-2


# --- subprocess runs -------------------------------------------------------------

@pytest.mark.slow
def test_eps_schedule_of_train_step(runs):
  """metrics['eps'] of every step is `schedules.epsilon` of that step, and the
  natural (ε = 0) steps are exactly those before the ramp starts."""
  from cerdeq_jax import schedules
  ref = _get(runs, 'ref')
  trace = ref['eps']
  assert trace.shape == (REF_STEPS,)
  expected = np.asarray([float(schedules.epsilon(
      s, EPS, h.SCHEDULE["steps_per_epoch"], h.SCHEDULE["eps_start_epochs"],
      h.SCHEDULE["eps_length_epochs"])) for s in range(REF_STEPS)])
  np.testing.assert_allclose(trace, expected, rtol=1e-6, atol=1e-9)
  cfg_start = int(h.SCHEDULE['eps_start_epochs'] * h.SCHEDULE['steps_per_epoch'])
  assert np.all(trace[:cfg_start + 1] == 0) and np.all(trace[cfg_start + 1:] > 0)
  # The ramp is strictly increasing, then flat at ε.
  ramp_end = cfg_start + int(h.SCHEDULE['eps_length_epochs'] * h.SCHEDULE['steps_per_epoch'])
  assert np.all(np.diff(trace[cfg_start:ramp_end + 1]) > 0)
  np.testing.assert_allclose(trace[ramp_end:], EPS, rtol=1e-6)


@pytest.mark.slow
def test_no_collective_inside_a_solver_loop(runs):
  """On 8 devices, the compiled train steps of the run (warm-up, ramp) and the
  eval step have their DEQ solver loops, and none holds a collective (each
  device solves its own slice of the batch), while a loop that stops on a
  global test does hold one: the reading finds what it looks for."""
  sharded = _get(runs, 'sharded')
  assert len(sharded['loops']) == 3 and np.all(sharded['loops'] > 0)
  assert sharded['loop_collectives'].tolist() == [0, 0, 0]
  assert int(sharded['detector_positive']) > 0


def test_sharded_equals_unsharded(runs):
  """7 steps (2 of them certified, with the Björck projection) on 8 devices
  give the 1-device parameters."""
  ref, sharded = _get(runs, 'ref'), _get(runs, 'sharded')
  assert int(sharded['device_count']) == 8 and int(ref['device_count']) == 1
  assert np.all(sharded['eps'][5:] > 0), 'the compared steps must include certified ones'
  np.testing.assert_allclose(sharded['eps'], ref['eps'][:SNAPSHOT], rtol=1e-6)
  snap = _snapshot(ref, 'params')
  # Training moved the parameters, so the comparison means something.
  moved = max(np.max(np.abs(snap[k] - ref['init_' + k])) for k in snap)
  assert moved > 1e-2
  h.assert_trees_close(snap, sharded, 'params', RTOL, PARAMS_ATOL)


@pytest.mark.slow
def test_batch_norm_statistics_are_global(runs):
  """Running BatchNorm statistics under 8-way sharding (2 examples per
  device) equal the single-device ones: the moments are over the global batch."""
  ref, sharded = _get(runs, 'ref'), _get(runs, 'sharded')
  snap = _snapshot(ref, 'batch_stats')
  assert snap, 'the model has BatchNorm statistics'
  # They moved away from the (0, 1) initialisation.
  assert max(np.max(np.abs(v - (1.0 if k.endswith('/var') else 0.0)))
             for k, v in snap.items()) > 1e-2
  h.assert_trees_close(snap, sharded, 'batch_stats', RTOL, ATOL)


@pytest.mark.slow
def test_two_processes_equal_one(runs):
  """2 processes (jax.distributed on localhost, CPU/gloo), each feeding its
  half of every global batch, train like one process on the full batch."""
  ref = _get(runs, 'ref')
  snap = {**_snapshot(ref, 'params'), **_snapshot(ref, 'batch_stats')}
  for i in range(2):
    multi = _get(runs, f'multi{i}')
    assert int(multi['process_count']) == 2 and int(multi['device_count']) == 2
    np.testing.assert_allclose(multi['eps'], ref['eps'][:SNAPSHOT], rtol=1e-6)
    h.assert_trees_close(snap, multi, 'params', RTOL, PARAMS_ATOL)
    h.assert_trees_close(snap, multi, 'batch_stats', RTOL, ATOL)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['bjorck', 'wn', 'sn'])
def test_projection_applied_in_step(runs, method):
  from cerdeq_jax.deq import abs_operator_bound
  from cerdeq_jax.parametrize import flatten_kernel
  scale = 0.95
  out = _get(runs, {'bjorck': 'ref', 'wn': 'wn', 'sn': 'sn'}[method])
  key = 'params/deq/hidden_kernel'
  kernel, initial = out[key], out['init_' + key]
  assert np.max(np.abs(kernel - initial)) > 1e-3, 'training did not move the kernel'
  bound = float(abs_operator_bound(kernel))
  assert bound <= scale + 1e-4
  if method == 'bjorck':
    # Rescaled onto the bound: L(W) = scale, and the flattened kernel has
    # equal singular values (Björck orthogonalised).
    assert math.isclose(bound, scale, rel_tol=1e-3)
    s = np.linalg.svd(np.asarray(flatten_kernel(kernel)), compute_uv=False)
    np.testing.assert_allclose(s, s[0], rtol=1e-2)
    assert float(abs_operator_bound(out['snap_' + key])) <= scale + 1e-4
  elif method == 'wn':
    taps = kernel.shape[0] * kernel.shape[1]
    assert math.isclose(math.sqrt(taps) * np.linalg.norm(kernel), scale, rel_tol=1e-4)
  else:
    sigma = np.linalg.svd(np.asarray(flatten_kernel(kernel)), compute_uv=False)[0]
    assert sigma <= scale * (1 + 1e-3)
    # The persisted power-iteration vector is updated by every step.
    trace = out['spectral_trace']
    assert trace.shape[0] == 3
    start = out['init_spectral/deq/hidden_kernel']
    assert np.max(np.abs(trace[0] - start)) > 1e-6
    assert np.all(np.max(np.abs(np.diff(trace, axis=0)), axis=1) > 1e-7)
    np.testing.assert_allclose(np.linalg.norm(trace, axis=1), 1.0, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('r', range(len(EVAL_EPS)), ids=[f'eps={e}' for e in EVAL_EPS])
def test_eval_invariants_on_trained_model(runs, r):
  """certified >= PGD >= standard error; nothing certified is broken by the
  library's PGD nor by a stronger, independent one."""
  ref = _get(runs, 'ref')
  ev = {k.split('/', 1)[1]: float(v) for k, v in ref.items() if k.startswith(f'eval{r}/')}
  n = ev['count']
  assert n == 64
  standard = 1 - ev['correct'] / n
  pgd = 1 - ev['pgd_robust'] / n
  certified = 1 - ev['certified'] / n
  assert certified >= pgd >= standard
  assert ev['certified_but_broken'] == 0
  # Per-sample certification recomputed outside eval_step agrees with it.
  mask = ref[f'certified_mask{r}']
  assert int(mask.sum()) == int(ev['certified'])
  assert not np.any(mask & ~ref['clean_correct'])
  # The stronger attack (40 steps x 3 restarts, margin loss, own code) breaks
  # no certified sample, and everything misclassified.
  broken = ref[f'strong_pgd_broken{r}']
  assert not np.any(mask & broken), np.flatnonzero(mask & broken)
  assert np.all(broken[~ref['clean_correct']])
  if EVAL_EPS[r] == EPS:
    # It learned: well below chance (75 %), and certifies a good part.
    assert standard <= 0.4 and certified <= 0.6, ev
  if EVAL_EPS[r] == 0.5:
    # There the bright quadrant can be swapped: the strong attack breaks
    # nearly everything, and at least what the library's 5-step PGD breaks.
    assert broken.mean() >= 0.9
    assert broken.sum() >= n - ev['pgd_robust']
