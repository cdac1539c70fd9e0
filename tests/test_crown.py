"""CROWN and CROWN-IBP (`cerdeq_jax.crown`, `cerdeq_jax.graph`) against
independent computations.

* A 2-layer ReLU MLP: the bounds equal CROWN written out by hand in NumPy
  (per-neuron relaxation, then the linear function minimised over the box).
* All neurons stable: the network is affine on the box, and CROWN equals the
  exact minimum of that affine map (from its Jacobian), so it is at least as
  tight as IBP.
* Random dense and conv nets (BatchNorm, average pooling, residual add, a DEQ
  cut): every sampled and PGD-attacked point satisfies the margin bounds.
* BatchNorm in training mode: the bounds are those of the network with the
  clean batch's moments frozen (built independently as an eval-mode network).
* The graph's logits and IBP margins are the model's; unsupported layers fail
  with a clear error.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import crown, ibp, layers, parametrize, solvers, training
from cerdeq_jax.interval import Interval, linf_ball

try:
  from tests import conftest as H
except ImportError:  # pragma: no cover
  import conftest as H


def key(n):
  return jax.random.key(n, impl='rbg')


class MLP(nn.Module):
  hidden: tuple = (6,)
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train=False, labels=None):
    x = layers.Flatten()(x)
    for h in self.hidden:
      x = layers.ReLU()(layers.Dense(h, bias_init=nn.initializers.normal(0.5))(x))
    return layers.ElidedDense(self.num_classes)(x, labels)


class ConvNet(nn.Module):
  """conv/s2 (VALID) -> BN -> ReLU -> conv (SAME) + residual -> ReLU -> avg pool
  -> dense -> BN -> ReLU -> classifier."""

  @nn.compact
  def __call__(self, x, train=False, labels=None):
    bias = nn.initializers.normal(0.3)
    x = layers.Conv(4, (3, 3), (2, 2), 'VALID', bias_init=bias)(x)
    x = layers.ReLU()(layers.BatchNorm(use_running_average=not train)(x))
    y = layers.Conv(4, (2, 2), bias_init=bias)(x)
    x = layers.ReLU()(layers.add(x, y))
    x = layers.Flatten()(layers.AvgPool((2, 2), (1, 1))(x))
    x = layers.Dense(8, bias_init=bias)(x)
    x = layers.ReLU()(layers.BatchNorm(use_running_average=not train)(x))
    return layers.ElidedDense(5)(x, labels)


class DEQNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False, labels=None):
    x = layers.DEQ(3, parametrization=parametrize.Parametrization('bjorck', 0.5),
                   solver=solvers.Anderson(tol=1e-5, max_iter=60))(x, strict=not train)
    x = layers.ReLU()(layers.Conv(4, (3, 3), (2, 2))(x))
    x = layers.ReLU()(layers.Dense(8)(layers.Flatten()(x)))
    return layers.ElidedDense(3)(x, labels)


def _randomise_stats(rng, variables):
  """Non-trivial BatchNorm running statistics (init has mean 0, var 1)."""
  def f(path, leaf):
    name = path[-1].key
    if name == 'mean':
      return jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
    return leaf
  return {**variables,
          'batch_stats': jax.tree_util.tree_map_with_path(f, variables['batch_stats'])}


def _bounds(model, variables, x, box, labels, **kw):
  fn = H.jit(lambda v, x, box, y: crown.clean_and_bounds(model, v, x, box, y, False,
                                                         mutable=['deq_stats'], **kw)[0])
  return fn(variables, x, box, labels)


# --- hand-built CROWN on a 2-layer MLP ------------------------------------------

def numpy_crown_mlp(w1, b1, w2, b2, lo, up, label):
  """CROWN of ``W2^T relu(W1^T x + b1) + b2`` for the margins of one sample,
  written out neuron by neuron (float64)."""
  c, r = (up + lo) / 2, (up - lo) / 2
  h_lo = c @ w1 + b1 - r @ np.abs(w1)
  h_up = c @ w1 + b1 + r @ np.abs(w1)
  out = np.zeros(w2.shape[1])
  for j in range(w2.shape[1]):
    if j == label:
      continue
    lam = w2[:, label] - w2[:, j]           # coefficient of each hidden ReLU output
    slope, const = np.zeros_like(lam), b2[label] - b2[j]
    for k, (l, u) in enumerate(zip(h_lo, h_up)):
      if l >= 0:
        slope[k] = 1.0
      elif u <= 0:
        slope[k] = 0.0
      elif lam[k] >= 0:                     # lower relaxation: 0 or 1 (CROWN's choice)
        slope[k] = 1.0 if u > -l else 0.0
      else:                                 # upper relaxation: the chord
        slope[k] = u / (u - l)
        const += lam[k] * (-slope[k] * l)
    d = lam * slope                         # relu(h_k) -> d_k h_k
    omega = w1 @ d                          # linear in x
    const += d @ b1
    out[j] = const + omega @ c - np.abs(omega) @ r
  return out


def test_two_layer_mlp_equals_numpy_crown():
  model = MLP((7,), 4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (5, 3)).astype(np.float32))
  labels = jnp.asarray([0, 1, 2, 3, 1])
  variables = model.init(key(0), x)
  box = linf_ball(x, 0.3)
  b = _bounds(model, variables, x, box, labels)
  b_full = _bounds(model, variables, x, box, labels, intermediate='crown')
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables['params'])
  w1, b1 = p['Dense_0']['kernel'], p['Dense_0']['bias']
  w2, b2 = p['ElidedDense_0']['kernel'], p['ElidedDense_0']['bias']
  lo, up = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  ref = np.stack([numpy_crown_mlp(w1, b1, w2, b2, lo[n], up[n], int(labels[n]))
                  for n in range(5)])
  # Some neurons are unstable, with both signs of coefficients: the test bites.
  h = (np.asarray(box.centre) @ w1 + b1, np.asarray(box.radius) @ np.abs(w1))
  assert np.any(np.abs(h[0]) < h[1])
  np.testing.assert_allclose(b.crown, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(b_full.crown, ref, atol=1e-5, rtol=1e-5)  # 2 layers: same
  np.testing.assert_allclose(b.ibp, ibp.elided_margins(
      ibp.relu(ibp.dense(box, variables['params']['Dense_0']['kernel'],
                         variables['params']['Dense_0']['bias'])),
      variables['params']['ElidedDense_0']['kernel'],
      variables['params']['ElidedDense_0']['bias'], labels), atol=1e-6)


# --- all neurons stable: CROWN is exact -----------------------------------------

def test_all_stable_crown_is_the_exact_linear_minimum():
  model = MLP((6, 6), 3)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0.2, 0.8, (4, 5)).astype(np.float32))
  labels = jnp.asarray([0, 1, 2, 0])
  variables = model.init(key(1), x)

  def preactivations(eps):
    _, cols = model.apply(variables, linf_ball(x, eps), labels=labels, mutable=['preactivations'])
    return training.sown(cols['preactivations'])
  # The largest ε (up to a factor 2) at which IBP keeps every neuron stable:
  # IBP radii grow linearly with ε while the neurons stay stable.
  eps = 0.5 * 1e-4 * min(float(jnp.min(jnp.abs(p.centre) / p.radius)) for p in preactivations(1e-4))
  box = linf_ball(x, eps)
  for pre in preactivations(eps):   # every pre-activation keeps its sign on the box
    assert bool(jnp.all((pre.lower > 0) | (pre.upper < 0)))
  b = _bounds(model, variables, x, box, labels, intermediate='crown')

  def margins(z):  # one sample
    logits = model.apply(variables, z[None])[0]
    return logits[labels_n] - logits
  exact = []
  for n in range(4):
    labels_n = int(labels[n])
    jac = np.asarray(jax.jacobian(margins)(x[n]), np.float64)   # (K, D): affine on the box
    m0 = np.asarray(margins(x[n]), np.float64)
    lo = np.asarray(box.lower[n] - x[n], np.float64)
    up = np.asarray(box.upper[n] - x[n], np.float64)
    exact.append(m0 + np.maximum(jac, 0) @ lo + np.minimum(jac, 0) @ up)
  exact = np.stack(exact)
  np.testing.assert_allclose(b.crown, exact, atol=2e-6, rtol=1e-5)
  assert bool(jnp.all(b.crown >= b.ibp - 1e-6))
  assert np.max(exact - np.asarray(b.ibp)) > 100 * 2e-6   # IBP is looser: the test bites


# --- soundness on random nets ----------------------------------------------------

def _check_sound(model, variables, x, labels, box, bounds, n_points=64, pgd_steps=30):
  rng = np.random.default_rng(2)
  lower = np.asarray(bounds)
  apply = H.jit(lambda z: ibp.margins_from_logits(model.apply(variables, z), labels))
  for z in H.uniform_in_box(rng, box.lower, box.upper, n_points):
    assert np.all(np.asarray(apply(z)) >= lower - 1e-5)
  # PGD: for every (sample, class) minimise that margin.
  k = lower.shape[1]

  def neg_margin(z, n, j):
    logits = model.apply(variables, z[None])[0]
    return logits[j] - logits[labels[n]]

  @H.jit
  def attack(x0):
    def one(n, j):
      return H.pgd_maximise(lambda z: neg_margin(z, n, j), box.lower[n], box.upper[n], x0[n],
                            steps=pgd_steps)
    ns, js = jnp.meshgrid(jnp.arange(x.shape[0]), jnp.arange(k), indexing='ij')
    return jax.vmap(jax.vmap(one))(ns, js)          # (N, K, ...)

  adv = attack(H.uniform_in_box(rng, box.lower, box.upper, 1)[0])
  logits = np.asarray(H.jit(lambda z: model.apply(variables, z))(
      adv.reshape((-1,) + x.shape[1:]))).reshape(x.shape[0], k, k)   # (n, j, logits)
  n_idx = np.arange(x.shape[0])[:, None]
  j_idx = np.arange(k)[None, :]
  found = logits[n_idx, j_idx, np.asarray(labels)[:, None]] - logits[n_idx, j_idx, j_idx]
  assert np.all(found >= lower - 1e-5)
  return found


@pytest.mark.parametrize('intermediate', ['ibp', 'crown'])
def test_dense_net_bounds_hold_on_sampled_and_pgd_points(intermediate):
  model = MLP((8, 8, 8), 4)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(0, 1, (3, 6)).astype(np.float32))
  labels = jnp.asarray([0, 2, 3])
  variables = model.init(key(3), x)
  box = linf_ball(x, 0.15)
  b = _bounds(model, variables, x, box, labels, intermediate=intermediate)
  _check_sound(model, variables, x, labels, box, b.crown)


@pytest.mark.parametrize('intermediate', ['ibp', 'crown'])
def test_conv_net_bounds_hold_on_sampled_and_pgd_points(intermediate):
  model = ConvNet()
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(0, 1, (2, 9, 9, 2)).astype(np.float32))
  labels = jnp.asarray([1, 4])
  variables = _randomise_stats(rng, model.init(key(4), x))
  box = linf_ball(x, 0.05, mean=(0.4, 0.5), std=(0.3, 0.25))
  b = _bounds(model, variables, x, box, labels, intermediate=intermediate)
  found = _check_sound(model, variables, x, labels, box, b.crown)
  if intermediate == 'crown':   # and full CROWN is tight enough to matter here
    assert float(jnp.mean(b.crown - b.ibp)) > 0
    assert np.all(np.isfinite(found))


def test_deq_cut_bounds_hold():
  """IBP through the DEQ (sound, strict), CROWN on the explicit tail after it."""
  model = DEQNet()
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.uniform(0, 1, (2, 6, 6, 1)).astype(np.float32))
  labels = jnp.asarray([0, 2])
  variables = model.init(key(5), x)
  box = linf_ball(x, 0.02)
  for intermediate in ('ibp', 'crown'):
    b = _bounds(model, variables, x, box, labels, intermediate=intermediate)
    assert np.all(np.isfinite(np.asarray(b.crown)))
    _check_sound(model, variables, x, labels, box, b.crown, n_points=16, pgd_steps=15)


# --- BatchNorm in training mode ----------------------------------------------------

def test_training_mode_bounds_are_those_of_the_frozen_moments_network():
  model = ConvNet()
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.uniform(0, 1, (4, 9, 9, 2)).astype(np.float32))
  labels = jnp.asarray([1, 4, 0, 2])
  variables = model.init(key(6), x)
  box = linf_ball(x, 0.03)
  train_b, cols = crown.clean_and_bounds(model, variables, x, box, labels, True,
                                         mutable=['batch_stats'])
  # The same network in eval mode with the clean batch's (biased) moments as
  # running statistics, computed here from the clean activations.
  _, inter = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'],
                         capture_intermediates=True)
  stats = {}
  for path in ('BatchNorm_0', 'BatchNorm_1'):
    prev = {'BatchNorm_0': 'Conv_0', 'BatchNorm_1': 'Dense_0'}[path]
    a = np.asarray(inter['intermediates'][prev]['__call__'][0], np.float64)
    axes = tuple(range(a.ndim - 1))
    stats[path] = {'mean': jnp.asarray(a.mean(axes), jnp.float32),
                   'var': jnp.asarray(a.var(axes), jnp.float32)}
  frozen = {'params': variables['params'], 'batch_stats': stats}
  eval_b = _bounds(model, frozen, x, box, labels)
  np.testing.assert_allclose(train_b.crown, eval_b.crown, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(train_b.ibp, eval_b.ibp, atol=1e-4, rtol=1e-4)
  # The running statistics were updated once (momentum 0.9), not twice.
  np.testing.assert_allclose(cols['batch_stats']['BatchNorm_0']['mean'],
                             0.1 * stats['BatchNorm_0']['mean'], atol=1e-6)


# --- plumbing --------------------------------------------------------------------

def test_graph_logits_and_ibp_margins_are_the_models():
  model = ConvNet()
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.uniform(0, 1, (2, 9, 9, 2)).astype(np.float32))
  labels = jnp.asarray([3, 0])
  variables = _randomise_stats(rng, model.init(key(7), x))
  box = linf_ball(x, 0.05)
  b = _bounds(model, variables, x, box, labels)
  (logits, margins), _ = training.clean_and_bounds(model, variables, x, box, labels, False)
  np.testing.assert_allclose(b.logits, logits, atol=1e-6)
  np.testing.assert_allclose(b.ibp, margins, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(b.crown)[np.arange(2), np.asarray(labels)], 0.0)


def test_crown_ibp_gradients_are_finite():
  model = ConvNet()
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.uniform(0, 1, (4, 9, 9, 2)).astype(np.float32))
  labels = jnp.asarray([1, 4, 0, 2])
  variables = model.init(key(8), x)
  box = linf_ball(x, 0.05)

  def loss(params):
    b, _ = crown.clean_and_bounds(model, {**variables, 'params': params}, x, box, labels, True,
                                  mutable=['batch_stats'])
    return jnp.mean(jax.nn.logsumexp(-crown.mixed_margins(b, 0.5), -1))
  grads = H.jit(jax.grad(loss))(variables['params'])
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


class _Pooled(nn.Module):
  pool: str = 'max'

  @nn.compact
  def __call__(self, x, train=False, labels=None):
    x = layers.MaxPool()(x) if self.pool == 'max' else layers.Activation(jnp.tanh)(x)
    return layers.ElidedDense(2)(layers.Flatten()(x), labels)


class _Stock(nn.Module):
  @nn.compact
  def __call__(self, x, train=False, labels=None):
    return layers.ElidedDense(2)(nn.Dense(3)(layers.Flatten()(x)), labels)


@pytest.mark.parametrize('model, error, text', [
    (_Pooled('max'), NotImplementedError, 'max pooling'),
    (_Pooled('tanh'), NotImplementedError, 'only ReLU'),
    (_Stock(), TypeError, 'without a CROWN rule')])
def test_unsupported_layers_fail_clearly(model, error, text):
  x = jnp.ones((1, 4, 4, 1)) * 0.5
  variables = model.init(key(0), x)
  with pytest.raises(error, match=text):
    crown.clean_and_bounds(model, variables, x, linf_ball(x, 0.1), jnp.zeros(1, jnp.int32),
                           False)


def test_relu_relaxation_is_valid_on_its_interval():
  rng = np.random.default_rng(9)
  lo = rng.normal(size=200).astype(np.float32)
  up = lo + rng.uniform(0, 2, 200).astype(np.float32)
  for rule in crown.LOWER_SLOPES:
    r = crown.relu_relaxation(Interval(jnp.asarray(lo), jnp.asarray(up)), rule)
    for t in np.linspace(0, 1, 11):
      z = lo + t * (up - lo)
      relu = np.maximum(z, 0)
      assert np.all(np.asarray(r.lower_slope) * z <= relu + 1e-6)
      assert np.all(np.asarray(r.upper_slope) * z + np.asarray(r.upper_intercept) >= relu - 1e-6)


# --- CROWN-IBP training and the CROWN verifier ---------------------------------------

def test_crown_ibp_schedule():
  """β = 1 - (1 - β_end)·ε/ε_max (published train.py); the CROWN pass runs on
  certified steps while β >= 1e-5, i.e. through the ramp, not after it."""
  cfg = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=4,
                                   eps_start_epochs=1, eps_length_epochs=2, method='crown_ibp')
  for step in (0, 5, 8, 11, 30):
    np.testing.assert_allclose(float(cfg.beta(step)), 1 - float(cfg.epsilon(step)) / 0.1,
                               atol=1e-6)
  kinds = [cfg.step_kind(s) for s in range(16)]
  assert [k.crown for k in kinds] == [False] * 5 + [True] * 7 + [False] * 4
  assert all(k.certified for k in kinds[5:])
  half = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=4,
                                    eps_start_epochs=1, eps_length_epochs=2,
                                    method='crown_ibp', beta_end=0.5)
  assert half.step_kind(30).crown and abs(float(half.beta(30)) - 0.5) < 1e-6
  plain = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=4)
  assert not any(plain.step_kind(s).crown for s in range(16))
  with pytest.raises(ValueError, match='method'):
    training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=4, method='lp')


def test_crown_ibp_train_step_minimises_the_mixed_bound():
  import optax
  model = ConvNet()
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.uniform(0, 1, (8, 9, 9, 2)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
  cfg = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(1.,), steps_per_epoch=4,
                                   eps_start_epochs=1, eps_length_epochs=2, reg_lambda=0.0,
                                   method='crown_ibp')
  tx = optax.sgd(1e-3)
  state = training.init_state(model, tx, key(10), x[:1])
  step = 7
  kind = cfg.step_kind(step)
  assert kind.crown and kind.certified and not kind.regularised
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  new, m = H.jit(lambda s, b: training.train_step(s, b, model=model, tx=tx, cfg=cfg, kind=kind))(
      state, {'image': x, 'label': labels})
  eps, beta = float(cfg.epsilon(step)), float(cfg.beta(step))
  assert 0 < beta < 1
  b, _ = crown.clean_and_bounds(model, state.variables(), x, linf_ball(x, eps), labels, True,
                                ['batch_stats'])
  mixed = beta * np.asarray(b.crown, np.float64) + (1 - beta) * np.asarray(b.ibp, np.float64)
  robust = np.mean(np.log(np.sum(np.exp(-mixed), -1)))
  np.testing.assert_allclose(float(m['loss']), robust, rtol=1e-5)
  np.testing.assert_allclose(float(m['crown_beta']), beta, rtol=1e-6)
  assert float(m['crown_gain']) > 0          # CROWN-IBP tighter than IBP here
  moved = jax.tree_util.tree_map(lambda a, c: float(jnp.max(jnp.abs(a - c))), new.params,
                                 state.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


@pytest.mark.parametrize('verifier', training.VERIFIERS)
def test_eval_step_with_a_crown_verifier(verifier):
  """certified <= certified_crown <= pgd_robust <= correct, and nothing certified
  is broken; with a small ε on an untrained net CROWN certifies more than IBP."""
  model = MLP((16, 16), 3)
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.uniform(0, 1, (32, 4, 4, 1)).astype(np.float32))
  cfg = training.CertifiedTraining(eps=0.01, mean=(0.,), std=(1.,), steps_per_epoch=1)
  state = training.init_state(model, __import__('optax').sgd(0.1), key(11), x[:1])
  labels = jnp.argmax(model.apply(state.variables(), x), -1)   # all correct
  batch = {'image': x, 'label': labels, 'mask': jnp.ones(32, bool)}
  out = H.jit(lambda s, b, k: training.eval_step(s, b, k, model=model, cfg=cfg, eps=0.03,
                                                 pgd_steps=20, verifier=verifier))(
      state, batch, jax.random.PRNGKey(0))
  plain = H.jit(lambda s, b, k: training.eval_step(s, b, k, model=model, cfg=cfg, eps=0.03,
                                                   pgd_steps=20))(state, batch,
                                                                  jax.random.PRNGKey(0))
  out = {k: float(v) for k, v in out.items()}
  assert out['certified'] == float(plain['certified'])
  assert out['certified'] < out['certified_crown'] <= out['pgd_robust'] <= out['correct'] == 32
  assert out['certified_but_broken'] == 0


def test_experiment_flags_are_validated():
  import dataclasses
  from experiments import common
  base = common.Config(dataset='fashion_mnist', model='cnn7')
  assert common.validate(dataclasses.replace(base, method='crown_ibp', verifier='crown',
                                             crown_max_neurons=512))
  for bad, text in ((dict(method='crown'), '--method'), (dict(verifier='lp'), '--verifier'),
                    (dict(crown_max_neurons=0), '--crown_max_neurons')):
    with pytest.raises(ValueError, match=text):
      common.validate(dataclasses.replace(base, **bad))
  # Runs from before the flag resume: the default method is left out of the identity.
  assert common.ADDED_FIELDS['method'] == 'ibp'
  assert 'verifier' in common.RUN_CONTROL and 'crown_max_neurons' in common.RUN_CONTROL
