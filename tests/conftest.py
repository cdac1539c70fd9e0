"""Shared fixtures and independent helpers for the core tests.

Everything here is written from scratch on top of `jax.numpy`/`jax.lax` (not on
top of `cerdeq_jax`), so that the tests compare the library against
independent computations.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax


# XLA:CPU spends most of these tests compiling tiny programs; its LLVM
# optimisation level does not change float semantics, only code speed, and
# lowering it makes compilation ~3x faster. Tests jit with this instead of
# `jax.jit`, so that a plain `pytest` run gets it too; `make test` sets the same
# options for every program of the run through XLA_FLAGS (Makefile).
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def jit(fn=None, **kwargs):
  """`jax.jit` with `FAST_COMPILE` options on the CPU (the device tests of the
  accelerator check keep an accelerator's own compiler settings)."""
  if fn is None:
    return functools.partial(jit, **kwargs)
  options = FAST_COMPILE if jax.default_backend() == 'cpu' else None
  return jax.jit(fn, compiler_options=options, **kwargs)


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', previous)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# --- reference layers (plain lax, no cerdeq_jax) ---

def ref_conv(x, kernel, strides=(1, 1), padding='SAME'):
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=lax.Precision.HIGHEST)


def ref_deq_step(z, kernel, injection):
  """One step of ``z <- relu(conv(z, W) + injection)`` for a batch ``(N, H, W, C)``."""
  return jax.nn.relu(ref_conv(z, kernel) + injection)


def ref_interval_deq_step(lower, upper, kernel, inj_lower, inj_upper):
  """IBP of one DEQ step in the W+/W- form of the paper (not centre/radius)."""
  kp, kn = jnp.maximum(kernel, 0), jnp.minimum(kernel, 0)
  up = ref_conv(upper, kp) + ref_conv(lower, kn) + inj_upper
  lo = ref_conv(lower, kp) + ref_conv(upper, kn) + inj_lower
  return jax.nn.relu(lo), jax.nn.relu(up)


def unrolled_deq(kernel, injection, steps):
  """``steps`` DEQ steps from zero in a fixed-length loop (differentiable)."""
  return lax.fori_loop(0, steps, lambda _, z: ref_deq_step(z, kernel, injection),
                       jnp.zeros_like(injection))


def unrolled_interval_deq(kernel, inj_lower, inj_upper, steps):
  def body(_, lu):
    return ref_interval_deq_step(lu[0], lu[1], kernel, inj_lower, inj_upper)
  zeros = jnp.zeros_like(inj_lower)
  return lax.fori_loop(0, steps, body, (zeros, zeros))


def conv_matrix(kernel, shape):
  """Dense matrix of ``x -> conv(x, kernel)`` ('SAME', zero padding) on one
  sample of ``shape = (H, W, C)``, built by applying it to basis vectors."""
  n = int(np.prod(shape))
  basis = jnp.eye(n, dtype=kernel.dtype).reshape((n,) + tuple(shape))
  cols = ref_conv(basis, kernel).reshape(n, -1)  # row i = W e_i
  return np.asarray(cols).T


def uniform_in_box(rng, lower, upper, n):
  """``n`` points uniformly distributed in the box, shape ``(n,) + lower.shape``
  (numpy random numbers: no compilation)."""
  lower, upper = np.asarray(lower), np.asarray(upper)
  u = rng.uniform(size=(n,) + lower.shape).astype(lower.dtype)
  return jnp.asarray(lower + u * (upper - lower))


def pgd_maximise(objective, lower, upper, x0, steps=40, step_frac=0.1):
  """Tiny PGD: sign-gradient ascent of a scalar ``objective(x)`` projected onto
  the box ``[lower, upper]``, from ``x0`` (e.g. a `uniform_in_box` point);
  returns the best iterate.

  The step size decays from ``step_frac`` of the box width to a tenth of it.
  Works under ``jit``/``vmap`` (lax loops only).
  """
  width = upper - lower
  value_and_grad = jax.value_and_grad(objective)

  def body(i, carry):
    x, best_x, best_v = carry
    v, g = value_and_grad(x)
    better = v > best_v
    best_x = jnp.where(better, x, best_x)
    best_v = jnp.where(better, v, best_v)
    frac = step_frac * (1.0 - 0.9 * i / steps)
    x = jnp.clip(x + frac * width * jnp.sign(g), lower, upper)
    return x, best_x, best_v

  x, best_x, best_v = lax.fori_loop(
      0, steps, body, (x0, x0, jnp.array(-jnp.inf, lower.dtype)))
  v = objective(x)
  return jnp.where(v > best_v, x, best_x)


def directional_fd(fn, x, v, h):
  """Central finite difference of scalar ``fn`` at ``x`` along ``v`` (pytrees;
  the shifted points are formed in numpy to avoid compiling eager ops)."""
  shift = lambda s: jax.tree_util.tree_map(
      lambda a, b: jnp.asarray(np.asarray(a) + s * np.asarray(b)), x, v)
  return (float(fn(shift(h))) - float(fn(shift(-h)))) / (2 * h)


def tree_dot(a, b):
  return float(sum(np.vdot(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def random_like(rng, tree):
  """Standard normal pytree like ``tree`` from a numpy ``rng`` (jax.random
  would compile a threefry kernel per shape)."""
  return jax.tree_util.tree_map(
      lambda l: jnp.asarray(rng.normal(size=l.shape).astype(np.asarray(l).dtype)), tree)


# --- end-to-end runs of the experiment CLI (test_experiments, test_pods) ---------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Tiny Fashion-MNIST IDX files (256 train, 64 test) in a module-wide folder."""
  import helpers_training as h
  return h.write_fashion_mnist(str(tmp_path_factory.mktemp('fashion_mnist')))


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Environment for experiment subprocesses, with a module-wide compilation cache."""
  import helpers_training as h
  return h.subprocess_env(str(tmp_path_factory.mktemp('compilation_cache')))
