"""Flax Linen layers that take an array or an `Interval` and return the same kind.

A user's own Linen model built from these layers computes logits for arrays and
certified bounds for an `Interval` input, with the same parameters:

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        x = layers.Conv(16, (3, 3))(x)
        x = layers.DEQ(16)(x)
        x = layers.ReLU()(layers.Flatten()(x))
        return layers.Dense(10)(x)

Interval-only by-products are *sown* (collected only when the collection is
mutable in ``apply``): ``'deq_stats'`` (solver statistics, certifiability) and
``'preactivations'`` (bounds in front of every ReLU layer, for the Fast-IBP
regularisers).
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cerdeq_jax import deq, ibp, ops, parametrize, reparam, solvers
from cerdeq_jax.interval import Interval  # re-exported for models

Array = jax.Array
Initializer = Callable[..., Array]

#: Name of the DEQ hidden kernel in params trees; `parametrize.project_tree`
#: projects the leaves with this name ('project' mode).
HIDDEN_KERNEL = parametrize.HIDDEN_KERNEL
#: Name of the free parameter V of the hidden kernel in 'reparam' mode.
HIDDEN_FREE = parametrize.HIDDEN_FREE
#: Collection holding the spectral-norm power-iteration vectors.
SPECTRAL = 'spectral'
#: Collection with the clean batch's BatchNorm moments (for interval training).
BATCH_MOMENTS = 'batch_moments'
#: Collection with each DEQ's nominal fixed point on the clean batch, the
#: start of its interval solve on the box around that batch.
DEQ_START = 'deq_start'


def clean_pass_collections(train: bool) -> list[str]:
  """The collections through which a clean call hands what it computed to the
  interval call that follows it in the same ``apply`` (mutable in both), in
  training only: evaluation bounds stay a function of the box alone."""
  return [BATCH_MOMENTS, DEQ_START] if train else []


def _is_box(x) -> bool:
  return isinstance(x, Interval)


class Dense(nn.Module):
  """Dense layer: ``(..., D_in) -> (..., features)``."""
  features: int
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    d_in = (x.lower if _is_box(x) else x).shape[-1]
    kernel = self.param('kernel', self.kernel_init, (d_in, self.features))
    bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
    if _is_box(x):
      return ibp.dense(x, kernel, bias)
    y = ops.dense(x, kernel)
    return y if bias is None else y + bias


class Conv(nn.Module):
  """2-D convolution on NHWC input, HWIO kernel."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: ops.Padding = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    c_in = (x.lower if _is_box(x) else x).shape[-1]
    if c_in % self.feature_group_count:
      raise ValueError(f'Conv: {c_in} input channels not divisible into '
                       f'{self.feature_group_count} groups.')
    kernel = self.param('kernel', self.kernel_init, tuple(self.kernel_size) + (
        c_in // self.feature_group_count, self.features))
    bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
    if _is_box(x):
      return ibp.conv(x, kernel, bias, self.strides, self.padding, self.feature_group_count)
    y = ops.conv(x, kernel, self.strides, self.padding, self.feature_group_count)
    return y if bias is None else y + bias


def batch_norm_affine(scale, bias, mean, var, epsilon):
  """BatchNorm as the per-channel affine map ``z -> mul * z + shift``; all
  arguments ``(C,)`` (epsilon a scalar). Returns ``(mul, shift)``."""
  mul = scale * jax.lax.rsqrt(var + epsilon)
  return mul, bias - mean * mul


class BatchNorm(nn.Module):
  """Batch normalisation over all axes but the last, for arrays and intervals.

  An affine map per channel for intervals. In training the interval uses the
  statistics of the *clean* batch, which the array call stores in the
  ``'batch_moments'`` collection: apply the model to the clean batch first, in
  the same ``apply``, with that collection mutable (the models in
  `cerdeq_jax.models` do this). In evaluation both use the running averages.
  Under ``jit`` with a sharded batch the moments are over the global batch.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = (x.lower if _is_box(x) else x).shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,))
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    elif _is_box(x):
      if not self.has_variable(BATCH_MOMENTS, 'mean'):
        raise ValueError(
            'BatchNorm on an Interval in training mode needs the clean batch statistics: '
            "apply the model to the clean batch first in the same apply, with "
            f"'{BATCH_MOMENTS}' mutable.")
      mean = self.get_variable(BATCH_MOMENTS, 'mean')
      var = self.get_variable(BATCH_MOMENTS, 'var')
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
      # Not at init: moments returned by `init` would be passed back to later
      # applies and silently stand in for the clean batch's.
      if self.is_mutable_collection(BATCH_MOMENTS) and not self.is_initializing():
        self.put_variable(BATCH_MOMENTS, 'mean', mean)
        self.put_variable(BATCH_MOMENTS, 'var', var)
    mul, shift = batch_norm_affine(scale, bias, mean, var, self.epsilon)
    if _is_box(x):
      return ibp.scale_shift(x, mul, shift)
    return x * mul + shift


class Activation(nn.Module):
  """Element-wise monotone non-decreasing activation.

  For intervals the input bounds are sown to ``'preactivations'`` when ``fn``
  is ReLU, so the Fast-IBP regularisers can see every ReLU layer.
  """
  fn: Callable = jax.nn.relu

  @nn.compact
  def __call__(self, x):
    if _is_box(x):
      if self.fn is jax.nn.relu:
        self.sow('preactivations', 'bounds', x)
      return ibp.monotone(x, self.fn)
    return self.fn(x)


def ReLU(name: str | None = None) -> Activation:  # pylint: disable=invalid-name
  return Activation(jax.nn.relu, name=name)


def add(a, b):
  """Residual add of two arrays or two intervals."""
  if _is_box(a) != _is_box(b):
    raise ValueError('add: cannot add an array and an Interval.')
  return ibp.add(a, b) if _is_box(a) else a + b


class ElidedDense(nn.Module):
  """The classifier. Arrays: logits ``(N, K)``. Interval (needs ``labels``):
  lower bounds of the margins ``logit_y - logit_j`` ``(N, K)`` of the elided
  last layer (0 at ``j = y``)."""
  features: int
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, labels=None):
    d_in = (x.lower if _is_box(x) else x).shape[-1]
    kernel = self.param('kernel', self.kernel_init, (d_in, self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    if _is_box(x):
      if labels is None:
        raise ValueError('ElidedDense on an Interval needs the labels.')
      return ibp.elided_margins(x, kernel, bias, labels)
    return ops.dense(x, kernel) + bias


class Flatten(nn.Module):
  """``(N, ...) -> (N, prod(...))``."""

  @nn.compact
  def __call__(self, x):
    if _is_box(x):
      return ibp.flatten(x)
    return x.reshape(x.shape[0], -1)


class Pool(nn.Module):
  """Pooling by ``pool`` (``nn.avg_pool``, ``nn.max_pool``): both are
  non-decreasing in every input, so an interval maps to its ends' images."""
  pool: Callable = nn.max_pool
  window: Sequence[int] = (2, 2)
  strides: Sequence[int] | None = None
  padding: str = 'VALID'

  @nn.compact
  def __call__(self, x):
    fn = lambda z: self.pool(z, tuple(self.window), self.strides and tuple(self.strides),
                             self.padding)
    return ibp.monotone(x, fn) if _is_box(x) else fn(x)


def AvgPool(window=(2, 2), strides=None, padding='VALID', name=None) -> Pool:  # pylint: disable=invalid-name
  return Pool(nn.avg_pool, window, strides, padding, name=name)


def MaxPool(window=(2, 2), strides=None, padding='VALID', name=None) -> Pool:  # pylint: disable=invalid-name
  return Pool(nn.max_pool, window, strides, padding, name=name)


class DEQ(nn.Module):
  """Certifiable DEQ layer ``z* = σ(W z* + U x + b)`` on NHWC input.

  ``U`` is a ``injection_kernel_size`` convolution ``C_in -> features`` (CerDEQ
  initialisation), ``W`` a stride-1 'SAME' ``kernel_size`` convolution
  ``features -> features`` kept contractive by ``parametrization`` (a
  `parametrize.Parametrization`, or just its method 'bjorck' | 'sn' | 'wn'):

  * ``mode='project'`` (default): W is the parameter ``'hidden_kernel'``,
    projected after every optimiser step by `parametrize.project_tree`; the
    initial value is already projected.
  * ``mode='reparam'``: the parameter is a free V (``'hidden_free'``, initially
    the projected kernel) and the forward uses ``W = reparam.effective_kernel(V)``
    (e.g. ``s * B(V) / b(B(V))``), differentiated through. Read W from
    variables with `reparam.hidden_kernel`.
  * ``bound='spectral'`` (default) keeps ``L = ||S||_2 <= scale``;
    ``bound='rho'`` keeps the looser Perron-root bound ``rho <= scale`` (then
    L may exceed 1 and certificates rest on rho; see `deq.sound_widening`).

  For 'sn' the power-iteration vector u lives in the ``'spectral'`` collection
  (under the parameter's name); the forward reads it, the train step updates it.

  With the ``'deq_start'`` collection mutable (in training:
  `clean_pass_collections`), an array call keeps its fixed point z* there and
  the next interval call of the same shape starts its solve at ``[z*, z*]``
  instead of zeros: for a box around that batch z* lies inside the interval
  fixed point (one Anderson iteration fewer of seven on the CIFAR-10 CerDEQ at
  ε = 8/255, two of five at ε = 0.001). The bounds are as sound from any start
  and equal to the solver's tolerance.

  For an `Interval` input, ``strict=True`` (the default, for certification)
  returns *sound* bounds: the interval fixed point widened so that it encloses
  the exact DEQ output for every input in the box (`deq.sound_widening`), and
  infinite bounds for samples that are not certifiable (solve not converged,
  or no contraction), so no later layer can certify them. ``strict=False``
  (for training losses) returns the computed interval fixed point as is.

  Sown: ``'deq_stats'`` / ``'nominal'`` or ``'interval'``: a `deq.DEQStats`; for intervals, the
  pre-activation bounds at the fixed point to ``'preactivations'``.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  injection_kernel_size: Sequence[int] = (3, 3)
  injection_strides: Sequence[int] = (1, 1)
  parametrization: parametrize.Parametrization | str = parametrize.Parametrization('bjorck')
  solver: solvers.Solver = solvers.Anderson(tol=1e-4, max_iter=50)
  adjoint_solver: solvers.Solver | None = None
  activation: Callable = jax.nn.relu
  injection_init: Initializer = parametrize.cerdeq_injection_init()

  def _hidden_kernel(self, param: parametrize.Parametrization) -> Array:
    """W ``(k, k, C, C)``: the parameter itself, or W(V) in 'reparam' mode."""
    kernel_shape = tuple(self.kernel_size) + (self.features, self.features)

    def init_hidden(key, shape):
      k_kernel, k_vector = jax.random.split(key)
      kernel = jax.random.normal(k_kernel, shape) / jnp.sqrt(jnp.prod(jnp.array(shape[:-1])))
      vector = parametrize.initial_spectral_vector(k_vector, kernel)
      return parametrize.project(kernel, vector, param)[0]

    name = param.param_name
    weight = self.param(name, init_hidden, kernel_shape)
    u = None
    if param.method == 'sn':
      def init_u(key):
        u0 = parametrize.initial_spectral_vector(key, weight)
        if param.mode == 'project':
          return u0
        # The reparam forward does not iterate: start from a converged u.
        return parametrize.power_iteration(parametrize.flatten_kernel(weight), u0, param.iters)[1]
      u = self.variable(SPECTRAL, name, init_u,
                        self.make_rng('params') if self.is_initializing() else None).value
    if param.mode == 'project':
      return weight
    return reparam.effective_kernel(weight, u, param)

  def _interval_start(self, injection) -> Interval | None:
    """``[z*, z*]`` for an interval injection when an array call kept z* of
    its shape (class docstring); None (zeros) otherwise."""
    if not (_is_box(injection) and self.is_mutable_collection(DEQ_START)
            and self.has_variable(DEQ_START, 'fixed_point')):
      return None
    start = self.get_variable(DEQ_START, 'fixed_point')
    return Interval(start, start) if start.shape == injection.lower.shape else None

  @nn.compact
  def __call__(self, x, strict: bool = True):
    inject = Conv(self.features, self.injection_kernel_size, self.injection_strides,
                  kernel_init=self.injection_init, name='injection')
    injection = inject(x)
    kernel = self._hidden_kernel(parametrize.as_parametrization(self.parametrization))
    z, stats = deq.solve_deq(kernel, injection, self.solver, self.adjoint_solver,
                             self.activation, z0=self._interval_start(injection), sound=strict)
    if not _is_box(z) and self.is_mutable_collection(DEQ_START) and not self.is_initializing():
      self.put_variable(DEQ_START, 'fixed_point', jax.lax.stop_gradient(z))
    self.sow('deq_stats', 'interval' if _is_box(z) else 'nominal', stats)
    if _is_box(z) and self.is_mutable_collection('preactivations'):
      pre = ibp.linear_map(z, lambda c: ops.same_conv(c, kernel),
                           lambda r: ops.same_conv(r, jnp.abs(kernel)))
      self.sow('preactivations', 'bounds',
               Interval(pre.lower + injection.lower, pre.upper + injection.upper))
    if _is_box(z) and strict:
      ok = stats.certifiable.reshape((-1,) + (1,) * (z.lower.ndim - 1))
      z = Interval(jnp.where(ok, z.lower, -jnp.inf), jnp.where(ok, z.upper, jnp.inf))
    return z
