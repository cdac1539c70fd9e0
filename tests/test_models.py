"""Models built from the layers: a user's own Linen model (with a DEQ) under
``jit``, ``vmap`` and inside NNX through ``flax.nnx.bridge``, and every model of
`cerdeq_jax.models.create`.

Soundness is checked against points: the bounds from an `Interval` must
enclose the outputs (or lower-bound the exact margins) of points sampled in
the box and of points found by a small PGD written here.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from cerdeq_jax import ibp, layers, models, parametrize, reparam, solvers, training
from cerdeq_jax.interval import Interval, linf_ball


def key(n):
  """A PRNG key of the 'rbg' implementation: initialisers compile several
  times faster on CPU than with the default threefry (same distributions)."""
  return jax.random.key(n, impl='rbg')


MEAN, STD = (0.5, 0.4, 0.45), (0.25, 0.2, 0.3)


def uniform_in_box(rng, box, n):
  """``n`` uniform points and two corners of the box, ``(n + 2,) + shape``."""
  lo, up = np.asarray(box.lower), np.asarray(box.upper)
  u = rng.uniform(size=(n,) + lo.shape).astype(lo.dtype)
  corners = np.where(rng.integers(0, 2, (2,) + lo.shape).astype(bool), up, lo)
  return jnp.asarray(np.concatenate([lo + u * (up - lo), corners]))


def sign_pgd(objective, box, x0, steps=10):
  """Sign-gradient *ascent* of a scalar objective in the box from x0."""
  width = box.upper - box.lower
  grad = jax.grad(objective)

  def body(i, z):
    frac = 0.25 * (1.0 - 0.9 * i / steps)
    return jnp.clip(z + frac * width * jnp.sign(grad(z)), box.lower, box.upper)
  return lax.fori_loop(0, steps, body, x0)


def on_points(fn, points):
  """``fn`` (a batch function) on ``(P, N, ...)`` points, as one batch."""
  p, n = points.shape[:2]
  out = fn(points.reshape((p * n,) + points.shape[2:]))
  return out.reshape((p, n) + out.shape[1:])


# --- a user's own model -------------------------------------------------------

class UserNet(nn.Module):
  """Conv/s2 -> BN -> ReLU -> DEQ, residual add -> MaxPool -> Flatten -> Dense."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    x = layers.Conv(4, (3, 3), strides=(2, 2))(x)
    x = layers.BatchNorm(use_running_average=True)(x)
    x = layers.ReLU()(x)
    h = layers.DEQ(4, parametrization=parametrize.Parametrization('bjorck', 0.5),
                   solver=solvers.Picard(tol=1e-5, max_iter=100))(x, strict=True)
    x = layers.add(x, h)
    x = layers.MaxPool((2, 2))(x)
    x = layers.Flatten()(x)
    return layers.Dense(self.num_classes)(x)


@pytest.fixture(scope='module')
def user_setup():
  net = UserNet()
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 8, 8, 3)), jnp.float32)
  variables = net.init(key(1), x)
  # Non-trivial running statistics; drop what init sowed.
  c = variables['batch_stats']['BatchNorm_0']['mean'].shape
  variables = {'params': variables['params'],
               'batch_stats': {'BatchNorm_0': {'mean': jnp.full(c, 0.1), 'var': jnp.full(c, 0.5)}}}
  box = Interval(x - 0.05, x + 0.05)
  return net, variables, x, box


def _cat(*arrays):
  return jnp.concatenate(arrays)


def test_user_model_under_jit_and_vmap(user_setup):
  net, variables, x, box = user_setup
  n = x.shape[0]
  rng = np.random.default_rng(0)
  samples = uniform_in_box(rng, box, 6)
  v = jnp.asarray(np.where(rng.integers(0, 2, (n, 3)), 1.0, -1.0), jnp.float32)
  apply = lambda z: net.apply(variables, z)

  @jax.jit
  def run(x, box, samples):
    one = lambda z: apply(z[None])[0]  # (H, W, C) -> (K,) through a batch of 1
    one_box = lambda b: jax.tree_util.tree_map(lambda a: a[0], apply(
        jax.tree_util.tree_map(lambda a: a[None], b)))
    attacked = sign_pgd(lambda z: jnp.sum(v * apply(z)), box, samples[0])
    values = on_points(apply, _cat(x[None], samples, attacked[None]))
    # The zero-width and the wide box as one interval batch.
    both = apply(Interval(_cat(x, box.lower), _cat(x, box.upper)))
    return dict(logits=values[0], values=values[1:], attacked=attacked,
                point=Interval(both.lower[:n], both.upper[:n]),
                bounds=Interval(both.lower[n:], both.upper[n:]),
                vmap_logits=jax.vmap(one)(x), vmap_bounds=jax.vmap(one_box)(box))
  res = jax.tree_util.tree_map(np.asarray, run(x, box, samples))

  logits = np.asarray(apply(x))  # eager
  assert logits.shape == (n, 3)
  np.testing.assert_allclose(res['logits'], logits, atol=1e-5)
  # Zero width: the logits, up to the DEQ's sound widening (L/(1-L) = 1 times
  # a residual of relative size <= 1e-5).
  np.testing.assert_allclose(res['point'].lower, logits, atol=1e-4)
  np.testing.assert_allclose(res['point'].upper, logits, atol=1e-4)
  # vmap over single-sample calls gives the batch results.
  np.testing.assert_allclose(res['vmap_logits'], res['logits'], atol=1e-5)
  np.testing.assert_allclose(res['vmap_bounds'].lower, res['bounds'].lower, atol=1e-5)
  np.testing.assert_allclose(res['vmap_bounds'].upper, res['bounds'].upper, atol=1e-5)
  # Sound: sampled and attacked logits inside the bounds (finite: certifiable).
  lo, up = res['bounds'].lower, res['bounds'].upper
  assert np.all(np.isfinite(lo)) and np.all(np.isfinite(up)) and np.all(up - lo > 1e-4)
  assert np.all(res['values'] >= lo - 1e-4) and np.all(res['values'] <= up + 1e-4)
  assert np.all(res['attacked'] >= np.asarray(box.lower))
  assert np.all(res['attacked'] <= np.asarray(box.upper))


class NNXNet(nnx.Module):
  """An NNX model holding the Linen model through the bridge."""

  def __init__(self, rngs: nnx.Rngs):
    self.body = nnx.bridge.ToNNX(UserNet(), rngs=rngs)

  def __call__(self, x):
    return self.body(x)


def test_user_model_inside_nnx_through_the_bridge(user_setup):
  net, _, x, box = user_setup
  model = NNXNet(nnx.Rngs(key(0)))
  nnx.bridge.lazy_init(model, x)
  # The Linen variables held by the NNX model.
  variables = {'params': nnx.to_pure_dict(nnx.state(model.body, nnx.Param)),
               'batch_stats': nnx.to_pure_dict(nnx.state(model.body, nnx.BatchStat))}
  assert variables['params']['DEQ_0']['hidden_kernel'].shape == (3, 3, 4, 4)
  # The clean batch and points sampled in the box, as one batch.
  points = _cat(x[None], uniform_in_box(np.random.default_rng(1), box, 4))
  batch = points.reshape((-1,) + x.shape[1:])
  out = np.asarray(model(batch))
  np.testing.assert_allclose(out, net.apply(variables, batch), atol=1e-6)
  bounds = model(box)
  assert isinstance(bounds, Interval)
  lo, up = np.asarray(bounds.lower), np.asarray(bounds.upper)
  vals = out.reshape(points.shape[:2] + out.shape[1:])[1:]
  assert np.all(np.isfinite(lo)) and np.all(np.isfinite(up))
  assert np.all(vals >= lo - 1e-4) and np.all(vals <= up + 1e-4)
  assert np.all(up - lo > 1e-4)


# --- the models of `create` ---------------------------------------------------

# cerdeq with its default solver (Anderson); the ablations with Picard, which
# compiles several times faster.
PICARD = solvers.Picard(tol=1e-4, max_iter=400)
MODELS = {
    'cerdeq': dict(width=4, dense=8),
    'deq_wn': dict(width=4, dense=8, solver=PICARD),
    'deq_sn': dict(width=4, dense=8, solver=PICARD),
    'cnn7': dict(width=4, dense=8),
    'wide_resnet': dict(width=1),
    'resnext': dict(width=8),
    'cnn_depth': dict(width=4, dense=8, depth=3),
    # name+variant: the model `name` with other DEQ parametrisation flags.
    'cerdeq+reparam+rho': dict(width=4, dense=8, deq_param_mode='reparam', deq_bound='rho'),
    'deq_sn+reparam': dict(width=4, dense=8, solver=PICARD, deq_param_mode='reparam'),
}
K = 3


def _variables(model, x):
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(key(0), x)
  # What training keeps (init also returns what it sowed).
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats', 'spectral')}


@pytest.mark.parametrize('name', list(MODELS))
def test_model_bounds_lower_bound_exact_margins(name):
  model = models.create(name.split('+')[0], K, image_size=32, **MODELS[name])
  rng = np.random.default_rng(0)
  n = 2
  pixels = rng.uniform(size=(n, 8, 8, 3)).astype(np.float32)
  x = (jnp.asarray(pixels) - jnp.asarray(MEAN)) / jnp.asarray(STD)
  labels = jnp.array([0, 2])
  box = linf_ball(x, 2 / 255, MEAN, STD)
  variables = _variables(model, x)
  samples = uniform_in_box(rng, box, 4)
  w = jnp.asarray(rng.uniform(0.5, 1.5, (n, K)), jnp.float32)

  @jax.jit
  def run(x, box, samples):
    exact = lambda z: ibp.margins_from_logits(model.apply(variables, z, train=False), labels)
    # PGD: push all margins down at once (ascent of minus a weighted sum).
    attacked = sign_pgd(lambda z: -jnp.sum(w * exact(z)), box, samples[0])
    # The clean batch, the sampled and the attacked points as one batch (each
    # with the box of its clean point): one array and one interval pass.
    points = jnp.concatenate([x[None], samples, attacked[None]])
    p = points.shape[0]
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    tile = lambda a: flat(jnp.broadcast_to(a, (p,) + a.shape))
    (logits, margins), cols = training.clean_and_bounds(
        model, variables, flat(points), Interval(tile(box.lower), tile(box.upper)),
        tile(labels), train=False, mutable=['deq_stats'])
    point_margins = ibp.margins_from_logits(logits, tile(labels)).reshape(p, n, K)
    return logits[:n], margins.reshape(p, n, K), point_margins[1:], attacked, cols

  logits, all_margins, point_margins, attacked, cols = run(x, box, samples)
  # The same box for every copy: the same bounds.
  np.testing.assert_allclose(all_margins, np.broadcast_to(all_margins[0], all_margins.shape),
                             atol=1e-6)
  margins = all_margins[0]
  assert logits.shape == (n, K)
  margins = np.asarray(margins)
  assert margins.shape == (n, K)
  assert np.all(np.isfinite(margins))
  assert np.all(margins[np.arange(n), np.asarray(labels)] == 0)
  assert np.all(np.asarray(point_margins) >= margins[None] - 1e-4)
  assert np.all(np.asarray(attacked) >= np.asarray(box.lower))
  assert np.all(np.asarray(attacked) <= np.asarray(box.upper))
  # The bounds have width: some margin lower bound is below the clean margin.
  lg = np.asarray(logits, np.float64)
  clean = lg[np.arange(n), np.asarray(labels)][:, None] - lg
  assert np.all(clean >= margins - 1e-5)
  assert np.max(clean - margins) > 1e-5
  if name.startswith('deq') or name.startswith('cerdeq'):
    (stats,) = cols['deq_stats']['deq']['interval']
    assert np.all(np.asarray(stats.certifiable))


def _n_kernels(variables, ndim):
  leaves = jax.tree_util.tree_leaves_with_path(variables['params'])
  return sum(1 for path, leaf in leaves if leaf.ndim == ndim and 'kernel' in str(path[-1]))


@pytest.mark.parametrize('depth', [2, 4, 6])
def test_cnn_depth_has_depth_conv_layers(depth):
  model = models.create('cnn_depth', K, depth=depth, width=2, dense=4)
  shapes = jax.eval_shape(lambda: model.init(key(0), jnp.ones((1, 8, 8, 3))))
  assert _n_kernels(shapes, 4) == depth
  assert _n_kernels(shapes, 2) == 2  # dense 4 + classifier


def _head_fan_in(name, image_size, **kw):
  model = models.create(name, K, image_size=image_size, **kw)
  shapes = jax.eval_shape(lambda: model.init(key(0), jnp.ones((1, 16, 16, 3))))
  return shapes['params']['DenseHead_0']['Dense_0']['kernel'].shape[0]


@pytest.mark.parametrize('name,factor', [('cnn7', 4), ('wide_resnet', 4), ('resnext', 4),
                                         ('cerdeq', 16)])
def test_image_size_64_adds_a_downsampling_stage(name, factor):
  kw = dict(MODELS[name])
  small, big = _head_fan_in(name, 32, **kw), _head_fan_in(name, 64, **kw)
  # One more stride-2 stage (cerdeq: also a stride-2 injection) on the same
  # 16x16 input: the flattened features shrink by 4 per halving.
  assert small == factor * big


def test_unknown_model_name_raises():
  with pytest.raises(ValueError):
    models.create('resnet9000', 10)


class DEQNet(nn.Module):
  """DEQ -> Flatten -> elided classifier: the DEQ is the only feature layer."""
  parametrization: parametrize.Parametrization

  @nn.compact
  def __call__(self, x, labels=None, strict=True):
    x = layers.DEQ(4, parametrization=self.parametrization,
                   solver=solvers.Anderson(tol=1e-4, max_iter=40), name='deq')(x, strict)
    return layers.ElidedDense(K)(layers.Flatten()(x), labels)


@pytest.mark.parametrize('method, bound', [('bjorck', 'rho'), ('sn', 'spectral'),
                                           ('wn', 'spectral')])
def test_reparam_training_decreases_the_certified_loss(method, bound):
  """Adam steps on the IBP loss of one batch in 'reparam' mode, with the
  after-step update of `parametrize.project_tree` (V untouched, SN's u
  advanced) as in `training.train_step`."""
  p = parametrize.Parametrization(method, 0.9, mode='reparam', bound=bound)
  model = DEQNet(p)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(16, 6, 6, K)), jnp.float32)
  labels = jnp.argmax(jnp.mean(x, (1, 2)), -1)  # learnable from the input
  box = Interval(x - 0.05, x + 0.05)
  variables = jax.jit(model.init)(key(0), x)
  params, spectral = variables['params'], variables.get(layers.SPECTRAL, {})
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, spectral, opt):
    def loss_fn(params):
      v = {'params': params, layers.SPECTRAL: spectral} if spectral else {'params': params}
      margins = model.apply(v, box, labels, strict=False)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(-margins, labels))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    params, spectral = parametrize.project_tree(optax.apply_updates(params, updates),
                                                spectral, p)
    return params, spectral, opt, loss

  state, losses = (params, spectral, tx.init(params)), []
  for _ in range(15):
    *state, loss = step(*state)
    losses.append(float(loss))
  new_params, new_spectral = state[0], state[1]
  assert losses[-1] < 0.7 * losses[0] and np.all(np.diff(losses) < 0), np.round(losses, 3)
  free = new_params['deq'][layers.HIDDEN_FREE]
  assert np.max(np.abs(free - params['deq'][layers.HIDDEN_FREE])) > 1e-3
  w = reparam.hidden_kernel(new_params['deq'], new_spectral.get('deq'), p)
  assert float(parametrize.contraction_bound(w, bound)) <= p.scale
  if method == 'sn':
    u0, u1 = (s['deq'][layers.HIDDEN_FREE] for s in (spectral, new_spectral))
    assert np.max(np.abs(u1 - u0)) > 1e-6
    np.testing.assert_allclose(np.linalg.norm(u1), 1.0, rtol=1e-5)


EXPLICIT_MESH_SCRIPT = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cerdeq_jax import losses, models, training
from cerdeq_jax.interval import linf_ball
x = jnp.asarray(np.random.RandomState(0).rand(8, 16, 16, 3), jnp.float32)
labels = jnp.arange(8) % 10
mesh = jax.make_mesh((4,), ('d',))  # jax's default axis type: explicit
out = {'axis_types': str(mesh.axis_types)}
for name in sys.argv[1:]:
  model = models.create(name, 10, image_size=16, width=32 if name in models.LINF_MODELS else 8,
                        depth=3 if name in models.LINF_MODELS else None, dense=16)
  variables = model.init(jax.random.PRNGKey(0), x)

  def loss(params, x):
    (logits, margins), _ = training.clean_and_bounds(
        model, {**variables, 'params': params}, x, linf_ball(x, 0.02, (0.,), (1.,)), labels,
        train=True, mutable=['batch_stats', 'deq_stats'])
    return losses.natural_cross_entropy(logits, labels) + losses.robust_cross_entropy(margins)

  step = jax.jit(jax.value_and_grad(loss))
  lone = jax.tree_util.tree_leaves(step(variables['params'], x))
  with jax.set_mesh(mesh):
    sharded = jax.tree_util.tree_leaves(
        step(variables['params'], jax.device_put(x, NamedSharding(mesh, P('d')))))
  out[name] = dict(scale=max(float(jnp.max(jnp.abs(b))) for b in lone),
                   error=max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(sharded, lone)))
print(json.dumps(out))
'''


def test_certified_loss_and_gradients_under_an_explicit_mesh():
  """A model's certified-training loss (clean and interval passes, BatchNorm
  or mean normalisation on the batch; for CerDEQ the DEQ solves and their
  implicit gradients, for the ℓ∞-dist Net its custom VJPs) on a batch sharded
  over a ``jax.make_mesh`` mesh (explicit axes) under ``jax.set_mesh``, in a
  user's own jit: the one-device loss and gradients."""
  from tests import helpers_training
  names = ('cerdeq', 'cnn7', 'linf_dist')
  out = helpers_training.run_on_devices(EXPLICIT_MESH_SCRIPT, *names, devices=4)
  assert 'Explicit' in out['axis_types']
  for name in names:
    assert out[name]['error'] <= 1e-5 * out[name]['scale'], (name, out[name])
