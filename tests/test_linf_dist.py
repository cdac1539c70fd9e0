"""ℓ∞-dist neurons and nets (`cerdeq_jax.linf_dist`, `models.linf_dist`,
`linf_training`) against independent computations.

* The layer (p = ∞ and finite p, mean shift in training and evaluation, bias)
  equals a NumPy loop; its interval bounds equal the exact per-neuron range
  (attained at points built here) and contain sampled points.
* The chunked custom-VJP ops equal the naive ``B x O x D`` ones, values and
  gradients, for chunk sizes that do and do not divide the width.
* The network is 1-Lipschitz in ℓ∞ (sampled pairs); a certified sample is
  never broken by PGD; the Lipschitz certificate implies the interval one.
* Loss, weight decay and schedules against their published formulas.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import attacks, linf_dist as L, linf_training, losses, models, training
from cerdeq_jax.interval import Interval, linf_ball

try:
  from tests import conftest as H
except ImportError:  # pragma: no cover
  import conftest as H


def _np_dist(x, w, p):
  """Loops: out[b, o] = ||x_b - w_o||_p in float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  out = np.zeros((x.shape[0], w.shape[0]))
  for b in range(x.shape[0]):
    for o in range(w.shape[0]):
      d = np.abs(x[b] - w[o])
      out[b, o] = d.max() if math.isinf(p) else (d ** p).sum() ** (1 / p)
  return out


def _naive(x, w, p):
  """The whole ``B x O x D`` tensor, plain autodiff (a constant scale m keeps
  ``d ** p`` finite: ``m (sum (d/m)^p)^(1/p)`` is the same function)."""
  d = jnp.abs(x[:, None, :] - w[None])
  if math.isinf(p):
    return jnp.max(d, -1)
  m = jax.lax.stop_gradient(jnp.max(d, -1, keepdims=True))
  return m[..., 0] * jnp.sum((d / m) ** p, -1) ** (1 / p)


def _data(seed, b=6, d=9, o=13):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(o, d)), jnp.float32), rng)


# --- the ops -----------------------------------------------------------------------

@pytest.mark.parametrize('chunk', [9, 5 * 9 * 6, 10 ** 6])  # 1 neuron / 5 (pads 13 -> 15) / all
def test_chunked_ops_equal_naive_values_and_gradients(chunk):
  x, w, rng = _data(0)
  g = jnp.asarray(rng.normal(size=(6, 13)), jnp.float32)
  cases = [(lambda x, w: L.linf_dist(x, w, chunk), math.inf),
           (lambda x, w: L.lp_dist(x, w, jnp.float32(8.0), chunk), 8.0),
           (lambda x, w: L.lp_dist(x, w, jnp.float32(300.0), chunk), 300.0),
           (lambda x, w: L.lp_dist(x, w, jnp.float32(jnp.inf), chunk), math.inf)]
  for fn, p in cases:
    np.testing.assert_allclose(fn(x, w), _np_dist(x, w, p), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda x, w: jnp.sum(fn(x, w) * g), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(_naive(x, w, p) * g), argnums=(0, 1))(x, w)
    # (|d|/u)^(p-1) multiplies float32 rounding of the ratio by p: tolerance too.
    tol = 2e-4 if p <= 8 or math.isinf(p) else 2e-3
    for a, r in zip(got, ref):
      np.testing.assert_allclose(a, r, rtol=tol, atol=tol / 10, err_msg=f'p={p}')


def test_lp_tends_to_linf():
  x, w, _ = _data(1)
  gap = lambda p: float(jnp.max(L.lp_dist(x, w, jnp.float32(p)) - L.linf_dist(x, w)))
  assert gap(8) > gap(100) > gap(1000) > 0
  assert gap(1000) < 0.01 * gap(8)


def test_bounds_are_the_exact_per_neuron_range():
  x, w, rng = _data(2)
  r = jnp.asarray(rng.uniform(0, 0.8, x.shape), jnp.float32)
  box = Interval(x - r, x + r)
  b = L.linf_dist_bounds(box, w, chunk_elements=40)
  lo, up = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  wn = np.asarray(w, np.float64)
  for n in range(x.shape[0]):
    for o in range(w.shape[0]):
      nearest = np.clip(wn[o], lo[n], up[n])                  # attains the minimum
      farthest = np.where(np.abs(lo[n] - wn[o]) > np.abs(up[n] - wn[o]), lo[n], up[n])
      np.testing.assert_allclose(b.lower[n, o], np.abs(nearest - wn[o]).max(), atol=1e-5)
      np.testing.assert_allclose(b.upper[n, o], np.abs(farthest - wn[o]).max(), atol=1e-5)
  for z in H.uniform_in_box(rng, box.lower, box.upper, 20):
    y = np.asarray(L.linf_dist(z, w))
    assert np.all(y >= np.asarray(b.lower) - 1e-5) and np.all(y <= np.asarray(b.upper) + 1e-5)


# --- the layer --------------------------------------------------------------------

def test_layer_equals_numpy_reference():
  x, _, rng = _data(3, o=1)
  layer = L.LinfDist(7, mean_normalize=True, use_bias=True)
  variables = layer.init(jax.random.PRNGKey(0), x)
  w = np.asarray(variables['params'][L.DIST_WEIGHT])
  # Identity init (D = 9 > 7 neurons: not applied); N(0, 1) entries.
  assert np.max(np.abs(w)) < 6
  b = jnp.asarray(rng.normal(size=7), jnp.float32)
  running = jnp.asarray(rng.normal(size=7), jnp.float32)
  variables = {'params': {L.DIST_WEIGHT: variables['params'][L.DIST_WEIGHT], 'bias': b},
               'batch_stats': {'mean': running}}
  for p in (math.inf, 8.0):
    ref = _np_dist(x, w, p)
    out, cols = layer.apply(variables, x, True, p, mutable=['batch_stats'])
    np.testing.assert_allclose(out, ref - ref.mean(0) + np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cols['batch_stats']['mean'],
                               0.9 * np.asarray(running) + 0.1 * ref.mean(0), rtol=1e-5,
                               atol=1e-6)
    out = layer.apply(variables, x, False, p)
    np.testing.assert_allclose(out, ref - np.asarray(running) + np.asarray(b), rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(ValueError, match='p = ∞'):
    layer.apply(variables, Interval(x, x), False, 8.0)


def test_identity_init():
  w = L.dist_init()(jax.random.PRNGKey(0), (10, 4))
  np.testing.assert_array_equal(np.asarray(w)[np.arange(10), np.arange(10) % 4], -10.0)


# --- the network ----------------------------------------------------------------------

def _net(head_hidden, seed=0):
  model = models.LinfDistNet(5, depth=3, width=24, head_hidden=head_hidden)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(size=(16, 4, 4, 1)), jnp.float32)   # pixels in [0, 1]
  variables = model.init(jax.random.PRNGKey(seed), x)
  # Running means converged on this batch (momentum 0.1), as after training:
  # mean shifts are constants in evaluation.
  step = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats'])[1])
  for _ in range(60):
    variables = {**variables, **step(variables)}
  return model, variables, x, rng


def test_pure_net_is_1_lipschitz_in_linf():
  model, variables, x, rng = _net(0)
  f = jax.jit(lambda z: model.apply(variables, z))
  for scale in (1e-3, 0.1, 2.0):
    d = jnp.asarray(rng.uniform(-scale, scale, x.shape), jnp.float32)
    y = np.asarray(f(x))
    change = np.max(np.abs(np.asarray(f(x + d)) - y), 1)
    dist = np.max(np.abs(np.asarray(d)).reshape(16, -1), 1)
    rounding = 8 * np.finfo(np.float32).eps * np.max(np.abs(y))   # logits are O(10)
    assert np.all(change <= dist + rounding)
    assert np.max(change / dist) > 0.5          # and not trivially contracting


@pytest.mark.parametrize('head_hidden', [0, 8])
def test_certified_samples_are_never_broken_and_lipschitz_implies_interval(head_hidden):
  model, variables, x, rng = _net(head_hidden, 1)
  logits = model.apply(variables, x)
  labels = jnp.argmax(logits, -1)                        # every clean point correct
  margin = np.sort(np.asarray(logits), 1)
  margin = margin[:, -1] - margin[:, -2]

  def certify(eps):
    box = linf_ball(x, eps)
    margins = model.apply(variables, box, labels=labels)
    return box, margins, np.asarray(jnp.all(jnp.where(jax.nn.one_hot(labels, 5, dtype=bool),
                                                      True, margins > 0), 1))
  # Pure net: certifies about half by Lipschitz alone. +MLP: the head is not
  # 1-Lipschitz; the largest ε on a grid that still certifies a few samples.
  eps = float(np.median(margin)) / 2 * 0.9
  if head_hidden:
    eps = max(e for e in np.geomspace(1e-4, 1, 25) if certify(e)[2].sum() >= 4)
  box, margins, certified = certify(eps)
  if head_hidden == 0:
    # The interval certificate is at least the Lipschitz one: m_j - 2 eps.
    clean = np.asarray(jnp.take_along_axis(logits, labels[:, None], 1) - logits)
    assert np.all(np.asarray(margins) >= clean - 2 * eps - 1e-5)
    assert np.all(certified[margin > 2 * eps * (1 + 1e-4)])
  assert 0 < certified.sum() < 16
  _, broken = attacks.pgd(lambda z: model.apply(variables, z), x, labels, box,
                          jax.random.PRNGKey(0), steps=30, restarts=3)
  assert not np.any(certified & np.asarray(broken))
  # Points sampled in the box keep the certified labels.
  f = jax.jit(lambda z: jnp.argmax(model.apply(variables, z), -1))
  for z in H.uniform_in_box(rng, box.lower, box.upper, 10):
    assert np.all(np.asarray(f(z))[certified] == np.asarray(labels)[certified])


def test_training_margins_of_the_lipschitz_box():
  model, variables, x, _ = _net(0, 2)
  labels = jnp.arange(16) % 5
  (logits, margins), _ = model.apply(variables, x, train=True, labels=labels, p=jnp.float32(8),
                                     radius=0.05, mutable=['batch_stats'])
  clean = np.asarray(jnp.take_along_axis(logits, labels[:, None], 1) - logits)
  expect = np.where(np.eye(5, dtype=bool)[np.asarray(labels)], 0.0, clean - 0.1)
  np.testing.assert_allclose(margins, expect, atol=1e-6)
  model, variables, x, _ = _net(8, 2)
  (logits, margins), _ = model.apply(variables, x, train=True, labels=labels, p=jnp.float32(8),
                                     radius=0.05, mutable=['batch_stats'])
  clean = np.asarray(jnp.take_along_axis(logits, labels[:, None], 1) - logits)
  assert np.all(np.asarray(margins) <= clean + 1e-6)


# --- training pieces ---------------------------------------------------------------

def test_hinge_loss_and_objective():
  rng = np.random.default_rng(4)
  m = rng.normal(size=(7, 4)).astype(np.float32)
  m[np.arange(7), np.arange(7) % 4] = 0
  viol = np.maximum(-m, 0)
  for mix in (1.0, 0.75):
    np.testing.assert_allclose(losses.hinge_loss(jnp.asarray(m), mix),
                               mix * viol.max(1).mean() + (1 - mix) * viol.mean(), rtol=1e-6)
  t = linf_training.LinfTraining(0.1, 10, loss='hinge', hinge_mix=1.0, kappa=0.7)
  logits = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  labels = jnp.arange(7) % 4
  clean = np.asarray(logits)[np.arange(7), np.asarray(labels)][:, None] - np.asarray(logits)
  got = t.objective(logits, jnp.asarray(m), labels)
  ref = 0.7 * viol.max(1).mean() + 0.3 * np.maximum(-clean, 0).max(1).mean()
  np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_p_and_radius_schedules_follow_the_published_formulas():
  t = linf_training.LinfTraining(0.2, 10, eps_start_epochs=0, eps_length_epochs=5, p_start=8,
                                 p_end=1000, p_start_epochs=5, p_end_epochs=35)
  for step in (0, 49, 50, 200, 349):
    ratio = min(max((step - 50) / 300, 0), 1)
    np.testing.assert_allclose(float(t.p(step)), 8 * math.exp(math.log(125) * ratio), rtol=1e-5)
  assert math.isinf(float(t.p(350))) and math.isinf(float(t.p(10 ** 6)))
  np.testing.assert_allclose([float(t.eps(s)) for s in (0, 25, 50, 99)], [0, 0.1, 0.2, 0.2],
                             rtol=1e-6)
  np.testing.assert_allclose(float(t.radius(50, (0.5, 0.25))), 0.2 / 0.25, rtol=1e-6)
  flat = linf_training.LinfTraining(0.2, 10)
  assert float(flat.eps(0)) == pytest.approx(0.2)


def test_lp_weight_decay_is_the_gradient_of_half_the_squared_norm():
  rng = np.random.default_rng(5)
  w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  for p in (2.0, 8.0, 30.0):
    ref = jax.grad(lambda v: 0.5 * jnp.sum(jnp.sum(jnp.abs(v) ** p, 1) ** (2 / p)))(w)
    np.testing.assert_allclose(linf_training.lp_decay_direction(w, jnp.float32(p)), ref,
                               rtol=1e-4, atol=1e-6)
  d = np.asarray(linf_training.lp_decay_direction(w, jnp.float32(jnp.inf)))
  at = np.argmax(np.abs(np.asarray(w)), 1)
  expect = np.zeros_like(d)
  expect[np.arange(4), at] = np.asarray(w)[np.arange(4), at]
  np.testing.assert_array_equal(d, expect)
  # In the optimiser: zero gradients leave only the decay, -lr * wd * direction.
  t = linf_training.LinfTraining(0.1, 1, p_start_epochs=0, p_end_epochs=0)   # p = ∞ at once
  tx, lr = linf_training.optimizer(0.5, 1, 10, 0.1, t)
  params = {'layer': {L.DIST_WEIGHT: w, 'bias': w[0]}}
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['layer'][L.DIST_WEIGHT], -0.5 * 0.1 * expect, rtol=1e-6)
  np.testing.assert_allclose(updates['layer']['bias'], -0.5 * 0.1 * np.asarray(w[0]), rtol=1e-6)
  np.testing.assert_allclose([float(lr(s)) for s in (0, 5, 10)], [0.5, 0.25, 0.0], atol=1e-6)


def test_train_step_runs_the_linf_objective():
  model, variables, x, _ = _net(0, 3)
  labels = jnp.arange(16) % 5
  t = linf_training.LinfTraining(0.1, 4, p_start_epochs=1, p_end_epochs=3)
  cfg = training.CertifiedTraining(eps=0.1, mean=(0.,), std=(0.5,), steps_per_epoch=4,
                                   method='linf_dist', linf=t, reg_lambda=0.0)
  assert cfg.step_kind(0) == cfg.step_kind(100) == training.StepKind(True, False)
  tx, _ = linf_training.optimizer(0.02, 4, 4, 5e-3, t)
  state = training.init_state(model, tx, jax.random.PRNGKey(3), x[:1])
  for step in (2, 13):
    s = state.replace(step=jnp.asarray(step, jnp.int32))
    new, m = H.jit(lambda s, b: training.train_step(s, b, model=model, tx=tx, cfg=cfg,
                                                    kind=cfg.step_kind(0)))(
        s, {'image': x, 'label': labels})
    p = float(t.p(step))
    (logits, margins), _ = model.apply(s.variables(), x, train=True, labels=labels,
                                       p=jnp.float32(p), radius=0.1 / 0.5,
                                       mutable=['batch_stats'])
    np.testing.assert_allclose(float(m['loss']), float(t.objective(logits, margins, labels)),
                               rtol=1e-5)
    np.testing.assert_allclose(float(m['linf_p']), min(p, 1e6), rtol=1e-5)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(new.params))
  with pytest.raises(ValueError, match='linf'):
    dataclasses.replace(cfg, linf=None)


def test_experiment_model_defaults_apply_unless_given():
  from experiments import common, fashion_mnist
  base = dataclasses.replace(fashion_mnist.DEFAULTS, model='linf_dist')
  c = common.with_model_defaults(base, fashion_mnist.MODEL_DEFAULTS)
  assert (c.width, c.depth, c.batch_size, c.epochs, c.lr) == (5120, 5, 512, 400, 0.02)
  assert c.linf_eps_train == 0.225 and c.linf_loss == 'hinge' and c.p_epochs == (50.0, 350.0)
  c = common.with_model_defaults(dataclasses.replace(base, width=64), fashion_mnist.MODEL_DEFAULTS,
                                 explicit={'width'})
  assert c.width == 64 and c.depth == 5
  assert common.validate(c)
  with pytest.raises(ValueError, match='do not apply'):
    common.validate(dataclasses.replace(c, method='crown_ibp'))
  mlp = common.with_model_defaults(dataclasses.replace(base, model='linf_dist_mlp'),
                                   fashion_mnist.MODEL_DEFAULTS)
  assert (mlp.depth, mlp.dense, mlp.linf_kappa, mlp.eps_length_epochs) == (4, 512, 0.5, 50)
  cnn = common.with_model_defaults(fashion_mnist.DEFAULTS, fashion_mnist.MODEL_DEFAULTS)
  assert cnn == fashion_mnist.DEFAULTS
