"""ℓ∞-dist Net and ℓ∞-dist Net+MLP (Zhang et al., ICML 2021; zbh2047/L_inf-dist-net).

* ``head_hidden = 0`` (the published ``MLP(depth, width)``): ``depth - 1``
  mean-shifted ℓ∞-dist layers of ``width`` neurons, then a biased ℓ∞-dist layer
  of ``num_classes`` neurons; logits are its *negated* outputs (a class is the
  nearest prototype). The whole network is 1-Lipschitz in ℓ∞ at ``p = ∞``.
* ``head_hidden > 0`` (``MLPFeature`` + ``Predictor``): ``depth`` ℓ∞-dist
  layers, then dense ``head_hidden`` -> tanh -> dense ``num_classes``, certified
  by IBP. The head's weights are stored N(0, 1) and scaled by ``1/sqrt(fan_in)``
  in the forward, as published (this sets Adam's effective step).

Calls: ``model(x, train)`` -> logits; ``model(box, train, labels)`` -> margin
lower bounds (exact interval through the ℓ∞-dist layers, IBP through the head),
like every model here; and for training ``model(x, train, labels, p=p,
radius=r)`` -> ``(logits, margins)`` with the margins of the Lipschitz box of
radius ``r`` (normalised input units) around the features: ``m_j - 2r`` for the
pure net (its logits move by at most ``r``), IBP of the head on ``f ± r`` for
+MLP. ``p`` (default a static ∞) may be a traced value in training.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from cerdeq_jax import ibp, layers, ops
from cerdeq_jax.interval import Interval
from cerdeq_jax.linf_dist import CHUNK_ELEMENTS, LinfDist


def _flat(x):
  if isinstance(x, Interval):
    return Interval(x.lower.reshape(x.lower.shape[0], -1), x.upper.reshape(x.upper.shape[0], -1))
  return x.reshape(x.shape[0], -1)


class ScaledDense(nn.Module):
  """Dense layer with N(0, 1) weights used as ``W / sqrt(fan_in)`` (the
  published ``BoundLinear``); arrays or intervals; ``elide`` with labels gives
  the elided margins of a classifier."""
  features: int

  @nn.compact
  def __call__(self, x, labels=None, elide: bool = False):
    d_in = (x.lower if isinstance(x, Interval) else x).shape[-1]
    kernel = self.param('kernel', nn.initializers.normal(1.0), (d_in, self.features))
    kernel = kernel / math.sqrt(d_in)
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    if not isinstance(x, Interval):
      return ops.dense(x, kernel) + bias
    if elide:
      return ibp.elided_margins(x, kernel, bias, labels)
    return ibp.dense(x, kernel, bias)


class LinfDistNet(nn.Module):
  num_classes: int
  depth: int = 5
  width: int = 5120
  head_hidden: int = 0
  chunk_elements: int = CHUNK_ELEMENTS

  @nn.compact
  def __call__(self, x, train: bool = False, labels=None, p=math.inf, radius=None):
    x = _flat(x)
    n_dist = self.depth if self.head_hidden else self.depth - 1
    for _ in range(n_dist):
      x = LinfDist(self.width, chunk_elements=self.chunk_elements)(x, train, p)
    if self.head_hidden:
      hidden, out = ScaledDense(self.head_hidden), ScaledDense(self.num_classes)
      tanh = layers.Activation(jnp.tanh)
      head = lambda z, y=None: out(tanh(hidden(z)), y, elide=y is not None)
    else:
      last = LinfDist(self.num_classes, mean_normalize=False, use_bias=True,
                      chunk_elements=self.chunk_elements)
    box = isinstance(x, Interval)
    if (box or radius is not None) and labels is None:
      raise ValueError('LinfDistNet: bounds (an Interval input or radius=) need the labels.')
    one_hot = nn.one_hot(labels, self.num_classes, dtype=bool) if labels is not None else None
    if radius is not None:
      if box:
        raise ValueError('LinfDistNet: radius= takes the clean array, not an Interval.')
      if self.head_hidden:
        return head(x), head(Interval(x - radius, x + radius), labels)
      logits = -last(x, train, p)
      # 1-Lipschitz logits move by at most radius each.
      return logits, jnp.where(one_hot, 0.0, ibp.margins_from_logits(logits, labels) - 2 * radius)
    if self.head_hidden:
      return head(x, labels if box else None)
    y = last(x, train, p)
    if not box:
      return -y
    # Logits are -y: logit_y - logit_j >= y_j.lower - y_y.upper.
    margins = y.lower - jnp.take_along_axis(y.upper, labels[:, None], 1)
    return jnp.where(one_hot, 0.0, margins)
