"""ℓ∞-dist neurons (Zhang et al., ICML 2021): ``u(x) = ||x - w||_p + b``.

A layer of them maps ``(B, D)`` to ``(B, O)``; with ``p = ∞`` every output is
1-Lipschitz in ℓ∞ (``| ||x - w|| - ||x' - w|| | <= ||x - x'||``), so a network
of them (with mean shifts and biases) is, and a margin larger than twice the
input radius is a certificate. Training relaxes ``p`` from 8 towards ∞.

Memory: the ``B x O x D`` tensor ``|x - w|`` is never held whole. The forward
runs over chunks of output neurons (``lax.map``, each chunk ``B x c x D`` with
``B·c·D <= chunk_elements``), and so does a custom VJP:

* `linf_dist` (``p = ∞``, static): the gradient of a max touches one input per
  neuron, so the forward keeps only the argmax ``(B, O)`` and the backward is
  two scatter-adds, no ``B x O x D`` work at all;
* `lp_dist` (any ``p``, traced, ∞ included): the backward recomputes each
  chunk, ``∂u/∂x_i = (|x_i - w_i| / u)^(p-1) sign(x_i - w_i)``.

`linf_dist_bounds` is the exact per-neuron interval of ``||x - w||_∞`` on a box.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from cerdeq_jax import per_device
from cerdeq_jax.interval import Interval
from cerdeq_jax.layers import BATCH_MOMENTS

#: Name of the ℓ∞-dist weights ``(O, D)`` in params trees (their weight decay is ℓp).
DIST_WEIGHT = 'dist_weight'
#: Elements of one ``B x c x D`` chunk (float32: 64 MiB).
CHUNK_ELEMENTS = 2 ** 24


def _chunk_size(batch: int, out: int, width: int, chunk_elements: int) -> int:
  return max(1, min(out, chunk_elements // max(1, batch * width)))


def _chunked(w, c):
  """``(O, D) -> (O_pad / c, c, D)``, zero rows appended (their outputs dropped)."""
  pad = -w.shape[0] % c
  return jnp.pad(w, ((0, pad), (0, 0))).reshape(-1, c, w.shape[1])


def _unchunk(y, out):
  """``(chunks, B, c) -> (B, O)``."""
  return jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1)[:, :out]


# --- p = ∞ -------------------------------------------------------------------

def _linf_forward(x, w, chunk_elements):
  c = _chunk_size(x.shape[0], w.shape[0], x.shape[1], chunk_elements)

  def one(wc):
    d = jnp.abs(x[:, None, :] - wc[None])
    return jnp.max(d, -1), jnp.argmax(d, -1).astype(jnp.int32)
  y, pos = jax.lax.map(one, _chunked(w, c))
  return _unchunk(y, w.shape[0]), _unchunk(pos, w.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linf_dist(x, w, chunk_elements: int = CHUNK_ELEMENTS):
  """``max_i |x[b, i] - w[o, i]|`` ``(B, O)``; x ``(B, D)``, w ``(O, D)``."""
  return _linf_forward(x, w, chunk_elements)[0]


def _linf_fwd(x, w, chunk_elements):
  y, pos = _linf_forward(x, w, chunk_elements)
  return y, (x, w, pos)


def _linf_bwd(chunk_elements, res, g):
  del chunk_elements
  x, w, pos = res
  rows = jnp.arange(x.shape[0])[:, None]
  cols = jnp.arange(w.shape[0])[None, :]
  # One input per (sample, neuron) carries the gradient: the argmax i, with
  # the sign of x_i - w_i there.
  signed = g * jnp.sign(jnp.take_along_axis(x, pos, 1) - w[cols, pos])
  dx = jnp.zeros_like(x).at[rows, pos].add(signed)
  dw = jnp.zeros_like(w).at[jnp.broadcast_to(cols, pos.shape), pos].add(-signed)
  return dx, dw


linf_dist.defvjp(_linf_fwd, _linf_bwd)


# --- any p ---------------------------------------------------------------------

def _lp_chunk(x, wc, p):
  """``||x - w||_p`` for a chunk of neurons, scaled by the max (no overflow of
  ``|d|^p``; the max itself is the ``p = ∞`` value)."""
  d = jnp.abs(x[:, None, :] - wc[None])
  m = jnp.max(d, -1, keepdims=True)
  # The max itself scales to exactly 1 (XLA may divide by a reciprocal, and
  # 0.99999994 ** ∞ = 0 would lose the p = ∞ term).
  scaled = jnp.where(d >= m, 1.0, d / jnp.maximum(m, jnp.finfo(d.dtype).tiny))
  return m[..., 0] * jnp.sum(scaled ** p, -1) ** (1 / p)


def _lp_forward(x, w, p, chunk_elements):
  c = _chunk_size(x.shape[0], w.shape[0], x.shape[1], chunk_elements)
  y = jax.lax.map(lambda wc: _lp_chunk(x, wc, p), _chunked(w, c))
  return _unchunk(y, w.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lp_dist(x, w, p, chunk_elements: int = CHUNK_ELEMENTS):
  """``||x[b] - w[o]||_p`` ``(B, O)`` for a (traced) ``p >= 1``, ∞ included."""
  return _lp_forward(x, w, p, chunk_elements)


def _lp_fwd(x, w, p, chunk_elements):
  y = _lp_forward(x, w, p, chunk_elements)
  return y, (x, w, p, y)


def _lp_bwd(chunk_elements, res, g):
  x, w, p, y = res
  c = _chunk_size(x.shape[0], w.shape[0], x.shape[1], chunk_elements)
  ys = _chunked(y.T, c).swapaxes(1, 2)                    # (chunks, B, c); padding: y = 0
  gs = _chunked(g.T, c).swapaxes(1, 2)

  def step(dx, chunk):
    wc, yc, gc = chunk
    diff = x[:, None, :] - wc[None]                       # recomputed, (B, c, D)
    y_safe = jnp.where(yc > 0, yc, 1.0)[..., None]
    ratio = jnp.where(jnp.abs(diff) >= y_safe, 1.0, jnp.abs(diff) / y_safe)   # as in _lp_chunk
    coef = (gc * (yc > 0))[..., None] * ratio ** (p - 1) * jnp.sign(diff)
    return dx + jnp.sum(coef, 1), -jnp.sum(coef, 0)

  dx, dw = jax.lax.scan(step, jnp.zeros_like(x), (_chunked(w, c), ys, gs))
  return dx, dw.reshape(-1, w.shape[1])[:w.shape[0]], jnp.zeros_like(p)


lp_dist.defvjp(_lp_fwd, _lp_bwd)


# --- bounds ----------------------------------------------------------------------

def linf_dist_bounds(box: Interval, w, chunk_elements: int = CHUNK_ELEMENTS) -> Interval:
  """Exact bounds of ``||x - w_o||_∞`` over the box, per sample and neuron.

  Per input i, ``|x_i - w_i|`` ranges over ``[dist(w_i, [l_i, u_i]),
  max(|l_i - w_i|, |u_i - w_i|)]`` independently of the others, and the max
  over i is monotone in each, so both ends are attained."""
  lo, up = box.lower, box.upper
  c = _chunk_size(lo.shape[0], w.shape[0], lo.shape[1], chunk_elements)

  def one(wc):
    below, above = lo[:, None, :] - wc[None], wc[None] - up[:, None, :]
    near = jnp.maximum(jnp.maximum(below, above), 0.0)   # distance from w_i to [l_i, u_i]
    far = jnp.maximum(jnp.abs(below), jnp.abs(above))
    return jnp.max(near, -1), jnp.max(far, -1)
  lower, upper = jax.lax.map(one, _chunked(w, c))
  return Interval(_unchunk(lower, w.shape[0]), _unchunk(upper, w.shape[0]))


def is_infinite(p) -> bool:
  """Whether ``p`` is a *static* ∞ (a Python number)."""
  return isinstance(p, (int, float)) and math.isinf(p)


def dist_init(identity: bool = True, scale: float = -10.0):
  """N(0, 1) weights ``(O, D)``; with ``identity`` and ``D <= O`` neuron o gets
  ``scale`` at input ``o mod D`` (the published "identity init": neuron o
  starts as ``-x_(o mod D)`` plus a constant, which the mean shift removes)."""
  def init(key, shape):
    w = jax.random.normal(key, shape)
    if identity and shape[1] <= shape[0]:
      o = jnp.arange(shape[0])
      w = w.at[o, o % shape[1]].set(scale)
    return w
  return init


class LinfDist(nn.Module):
  """A fully connected layer of ℓp-dist neurons, ``(N, D) -> (N, features)``.

  ``mean_normalize``: subtract the batch mean of each neuron in training (the
  clean batch's, also for an `Interval`, read from ``'batch_moments'`` as in
  `layers.BatchNorm`), its running mean (momentum ``momentum``, as published
  0.1) in evaluation. Called with an `Interval`, ``p`` must be a static ∞.
  """
  features: int
  mean_normalize: bool = True
  use_bias: bool = False
  identity_init: bool = True
  momentum: float = 0.1
  chunk_elements: int = CHUNK_ELEMENTS

  @nn.compact
  def __call__(self, x, train: bool = False, p=math.inf):
    box = isinstance(x, Interval)
    d_in = (x.lower if box else x).shape[-1]
    w = self.param(DIST_WEIGHT, dist_init(self.identity_init), (self.features, d_in))
    if box and not is_infinite(p):
      raise ValueError('LinfDist bounds an Interval at p = ∞ only (certify at p = ∞).')

    def distances(x, w):
      if box:
        return linf_dist_bounds(x, w, self.chunk_elements)
      if is_infinite(p):
        return linf_dist(x, w, self.chunk_elements)
      return lp_dist(x, w, jnp.asarray(p, x.dtype), self.chunk_elements)
    y = per_device.automatic_axes(distances, x, w)
    if self.mean_normalize:
      running = self.variable('batch_stats', 'mean', jnp.zeros, (self.features,))
      if not train:
        mean = running.value
      elif box:
        if not self.has_variable(BATCH_MOMENTS, 'mean'):
          raise ValueError('LinfDist on an Interval in training mode needs the clean batch '
                           f"mean: apply the clean batch first with '{BATCH_MOMENTS}' mutable.")
        mean = self.get_variable(BATCH_MOMENTS, 'mean')
      else:
        mean = jnp.mean(y, 0)
        if not self.is_initializing():
          running.value = (1 - self.momentum) * running.value + self.momentum * mean
          if self.is_mutable_collection(BATCH_MOMENTS):
            self.put_variable(BATCH_MOMENTS, 'mean', mean)
      y = Interval(y.lower - mean, y.upper - mean) if box else y - mean
    if self.use_bias:
      b = self.param('bias', nn.initializers.zeros, (self.features,))
      y = Interval(y.lower + b, y.upper + b) if box else y + b
    return y
