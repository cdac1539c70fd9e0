"""Tests of `cerdeq_jax.ops`: the custom-VJP `same_conv` against plain XLA.

The reference is `jax.vjp` of ``lax.conv_general_dilated(..., 'SAME')`` (via
`conftest.ref_conv`), i.e. XLA's own transposed convolutions, for odd *and*
even kernels: XLA pads an even kernel asymmetrically (one pixel more after),
which the hand-written input-VJP must mirror.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import ops
from conftest import jit, ref_conv

ATOL = 1e-5
# (kh, kw): sizes 1-4 square, and rectangular ones mixing odd and even.
KERNELS = [(1, 1), (2, 2), (3, 3), (4, 4), (2, 3), (4, 1)]


# (C_in, C_out): the kernel gradient's two forms, a scan over the taps and, for
# an input narrower than k*k*C_in <= C_out, all taps in one product.
CHANNELS = [(3, 4), (2, 40)]


def _data(rng, kh, kw, size=(5, 6), channels=(3, 4)):
  c_in, c_out = channels
  x = rng.normal(size=(2,) + size + (c_in,)).astype(np.float32)
  kernel = rng.normal(size=(kh, kw, c_in, c_out)).astype(np.float32)
  g = rng.normal(size=(2,) + size + (c_out,)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(g)


def _value_and_vjp(fn, x, kernel, g):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y,) + vjp(g)


def _assert_close(ours, ref):
  """Value, input gradient and kernel gradient, each against the reference."""
  for name, a, b in zip(('value', 'input gradient', 'kernel gradient'), ours, ref):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize('channels', CHANNELS)
@pytest.mark.parametrize('kh, kw', KERNELS)
def test_same_conv_value_and_gradients_match_xla(rng, kh, kw, channels):
  x, kernel, g = _data(rng, kh, kw, channels=channels)
  ours = jit(lambda x, k, g: _value_and_vjp(ops.same_conv, x, k, g))(x, kernel, g)
  ref = jit(lambda x, k, g: _value_and_vjp(ref_conv, x, k, g))(x, kernel, g)
  _assert_close(ours, ref)


@pytest.mark.parametrize('channels', CHANNELS)
@pytest.mark.parametrize('kh, kw', [(2, 2), (4, 4)])
def test_same_conv_gradients_under_vmap_match_xla(rng, kh, kw, channels):
  """A user's per-sample cell runs `same_conv` under ``vmap``."""
  x, kernel, g = _data(rng, kh, kw, size=(4, 4), channels=channels)
  per_sample = lambda conv: jax.vmap(
      lambda xi, gi: _value_and_vjp(lambda a, k: conv(a[None], k)[0], xi, kernel, gi))
  ours = jit(per_sample(ops.same_conv))(x, g)
  ref = jit(per_sample(ref_conv))(x, g)
  _assert_close(ours, ref)


@pytest.mark.parametrize('channels', CHANNELS)
def test_same_conv_kernel_larger_than_input(rng, channels):
  x, kernel, g = _data(rng, 4, 4, size=(2, 3), channels=channels)
  ours = jit(lambda x, k, g: _value_and_vjp(ops.same_conv, x, k, g))(x, kernel, g)
  ref = jit(lambda x, k, g: _value_and_vjp(ref_conv, x, k, g))(x, kernel, g)
  _assert_close(ours, ref)


@pytest.mark.parametrize('channels', CHANNELS)
@pytest.mark.parametrize('kh, kw', KERNELS)
@pytest.mark.parametrize('strides, size', [((2, 2), (7, 8)), ((2, 2), (8, 6)), ((3, 2), (8, 7))])
def test_strided_same_conv_value_and_gradients_match_xla(rng, kh, kw, channels, strides, size):
  """Strides 2 and 3 (the input-VJP by phases), odd and even input sizes, so
  that XLA's 'SAME' padding is 0, 1 or 2 and may be uneven."""
  x, kernel, _ = _data(rng, kh, kw, size=size, channels=channels)
  ref_fn = lambda x, k: jax.lax.conv_general_dilated(
      x, k, strides, 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  y = ref_fn(x, kernel)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  ours = jit(lambda x, k, g: _value_and_vjp(
      lambda a, b: ops.same_conv(a, b, strides=strides), x, k, g))(x, kernel, g)
  ref = jit(lambda x, k, g: _value_and_vjp(ref_fn, x, k, g))(x, kernel, g)
  _assert_close(ours, ref)


@pytest.mark.parametrize('strides, padding, groups, custom', [
    ((1, 1), 'SAME', 1, True),       # same_conv, even kernels included
    ((2, 2), 'SAME', 1, True),       # strided
    ((1, 1), 'VALID', 1, False),
    ((1, 1), 'SAME', 3, False),      # grouped (depthwise)
])
def test_conv_op_routes_and_matches_xla(rng, strides, padding, groups, custom):
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 3)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(2, 2, 3 // groups, 3)).astype(np.float32))
  fn = ops.conv_op(kernel, strides, padding, groups)
  ref = jax.lax.conv_general_dilated(
      x, kernel, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(jit(fn)(x), ref, atol=ATOL)
  jaxpr = str(jax.make_jaxpr(fn)(x))
  assert ('custom_vjp_call' in jaxpr) == custom, jaxpr


EXPLICIT_SCRIPT = r'''
import contextlib, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from cerdeq_jax import ops
rng = np.random.RandomState(0)
x = jnp.asarray(rng.randn(4, 6, 6, 3), jnp.float32)
conv_k = jnp.asarray(rng.randn(3, 3, 3, 5), jnp.float32)
dense_k = jnp.asarray(rng.randn(3, 5), jnp.float32)
products = {'conv': (lambda x, k: ops.conv(x, k, strides=(2, 2)), conv_k),
            'same_conv': (lambda x, k: ops.same_conv(x, k, strides=(2, 2)), conv_k),
            'dense': (ops.dense, dense_k)}
mesh = jax.make_mesh((2,), ('d',), axis_types=(AxisType.Explicit,))
out = {}
for name, (fn, kernel) in products.items():
  loss = lambda x, k: jnp.sum(jnp.sin(fn(x, k)))
  grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  lone = jax.tree_util.tree_leaves(grads(x, kernel))
  for in_context in (True, False):
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
      sharded = grads(jax.device_put(x, NamedSharding(mesh, P('d'))), kernel)
    out[f'{name}, mesh in context: {in_context}'] = [
        max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(sharded), lone)),
        str(jax.typeof(sharded[1][0]).sharding.spec[0])]
print(json.dumps(out))
'''


def test_products_and_their_gradients_under_explicit_sharding():
  """`conv`, strided `same_conv` and `dense` of a batch sharded over explicit mesh axes (the
  default of ``jax.make_mesh``), with the mesh in context or not: value and
  gradients for input and kernel equal one device's (jax 0.10 has no
  explicit-sharding rule for the kernel gradient's batch sum), and the input
  gradient keeps the batch's layout."""
  from tests import helpers_training
  out = helpers_training.run_on_devices(EXPLICIT_SCRIPT, devices=2)
  assert len(out) == 6
  for case, (error, batch_spec) in out.items():
    assert error < 1e-4 and batch_spec == 'd', case
