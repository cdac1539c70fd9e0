"""`cerdeq_jax.attacks.pgd` on models where the answer is known.

For a two-class linear model the cross-entropy grows with
``(w_j - w_y) . x``, so the worst point of a box is the corner
``sign(w_j - w_y)`` (upper where positive, lower where negative).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cerdeq_jax.attacks import pgd
from cerdeq_jax.interval import Interval


def key(n):
  """A PRNG key of the 'rbg' implementation: initialisers compile several
  times faster on CPU than with the default threefry (same distributions)."""
  return jax.random.key(n, impl='rbg')


D = 5


def _pgd(logits_fn, x, labels, box, key, **kw):
  """`pgd` under one `jit` (compiling it is cheaper than running it eagerly)."""
  run = jax.jit(lambda x, labels, box, key: pgd(logits_fn, x, labels, box, key, **kw))
  return run(x, jnp.asarray(labels), box, key)


def _linear(w, b):
  return lambda z: z @ w + b


def _setup(seed=0, n=3):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(D, 2)).astype(np.float32)
  w[:, 1] = w[:, 0] + np.where(rng.random(D) > 0.5, 1.0, -1.0) * rng.uniform(0.5, 1.5, D)
  x = rng.normal(size=(n, D)).astype(np.float32)
  return jnp.asarray(w), jnp.asarray(x)


def _worst_corner(w, box, labels):
  w = np.asarray(w)
  d = w[:, 1 - np.asarray(labels)].T - w[:, np.asarray(labels)].T  # (N, D): w_j - w_y
  return np.where(d > 0, np.asarray(box.upper), np.asarray(box.lower))


def _margin(w, b, z, labels):
  lg = np.asarray(z, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  n = np.arange(len(labels))
  return lg[n, labels] - lg[n, 1 - labels]


def test_pgd_finds_the_only_misclassified_corner():
  w, x = _setup()
  labels = np.array([0, 1, 0])
  r = 0.1
  box = Interval(x - r, x + r)
  corner = _worst_corner(w, box, labels)
  # Bias per sample such that the margin is -delta at the worst corner and
  # positive everywhere else on the PGD grid (steps of r/4 per coordinate).
  d_min = np.min(np.abs(np.asarray(w[:, 1] - w[:, 0])))
  delta = 0.05 * r * d_min
  base = _margin(w, np.zeros(2), corner, labels)  # margin at the corner, no bias
  # Shift the logits of the true class (per sample) through an extra input.
  shift = jnp.asarray(-base - delta, jnp.float32)
  onehot = jax.nn.one_hot(labels, 2)
  logits_fn = lambda z: z @ w + shift[:, None] * onehot
  clean = np.asarray(jnp.argmax(logits_fn(x), -1))
  np.testing.assert_array_equal(clean, labels)  # the clean points are correct
  x_adv, broken = _pgd(logits_fn, x, labels, box, key(0), steps=10)
  assert np.all(np.asarray(broken))
  np.testing.assert_allclose(x_adv, corner, atol=1e-6)


def test_pgd_returns_the_worst_corner_when_nothing_breaks():
  w, x = _setup(1)
  labels = np.array([0, 1, 1])
  box = Interval(x - 0.2, x + 0.2)
  corner = _worst_corner(w, box, labels)
  # Margin 2 at the worst corner: correct everywhere in the box, with a loss
  # that does not underflow.
  shift = jnp.asarray(2.0 - _margin(w, np.zeros(2), corner, labels), jnp.float32)
  logits_fn = lambda z: z @ w + shift[:, None] * jax.nn.one_hot(labels, 2)
  x_adv, broken = _pgd(logits_fn, x, labels, box, key(0), steps=10)
  assert not np.any(np.asarray(broken))
  # "The strongest point found": the corner of largest loss, not the start.
  np.testing.assert_allclose(x_adv, corner, atol=1e-6)
  np.testing.assert_allclose(_margin(w, np.zeros(2), x_adv, labels) + np.asarray(shift), 2.0,
                             rtol=1e-4)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _mlp(seed):
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(size=(D, 16)) / np.sqrt(D), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, 3)) / 4.0, jnp.float32)
  return lambda z: jnp.tanh(z @ w1) @ w2


def test_pgd_stays_inside_the_box():
  f = _mlp(0)
  x = _normal(1, (8, D))
  labels = jnp.argmax(f(x), -1)
  lower = x - jnp.linspace(0.0, 0.5, D)  # one coordinate of zero width
  box = Interval(lower, x + jnp.linspace(0.0, 0.3, D))
  x_adv, _ = _pgd(f, x, labels, box, key(2), steps=4, restarts=2, step_fraction=4.0)
  assert np.all(np.asarray(x_adv) >= np.asarray(box.lower))
  assert np.all(np.asarray(x_adv) <= np.asarray(box.upper))
  np.testing.assert_array_equal(x_adv[:, 0], x[:, 0])


def test_pgd_broken_for_misclassified_clean_points():
  f = _mlp(3)
  x = _normal(4, (6, D))
  pred = np.asarray(jnp.argmax(f(x), -1))
  labels = pred.copy()
  labels[[1, 4]] = (pred[[1, 4]] + 1) % 3  # two samples misclassified at x
  labels = jnp.asarray(labels)
  # Zero-width box: exactly the clean misclassifications.
  _, broken = _pgd(f, x, labels, Interval(x, x), key(0), steps=3)
  np.testing.assert_array_equal(broken, [False, True, False, False, True, False])
  # A small box: still broken (the clean point is in the box), and for those
  # samples the returned point is the clean one (the first misclassified).
  x_adv, broken = _pgd(f, x, labels, Interval(x - 1e-3, x + 1e-3), key(0), steps=3)
  assert bool(broken[1]) and bool(broken[4])
  np.testing.assert_array_equal(x_adv[1], x[1])


def test_pgd_restarts_never_make_results_worse():
  f = _mlp(5)
  x = _normal(6, (32, D))
  labels = jnp.argmax(f(x), -1)
  box = Interval(x - 0.6, x + 0.6)
  ce = lambda z: np.asarray(optax.softmax_cross_entropy_with_integer_labels(f(z), labels))
  adv1, broken1 = _pgd(f, x, labels, box, key(7), steps=3, restarts=1)
  adv4, broken4 = _pgd(f, x, labels, box, key(7), steps=3, restarts=3)
  b1, b4 = np.asarray(broken1), np.asarray(broken4)
  assert np.all(b4 | ~b1)  # every sample broken without restarts stays broken
  assert 0 < b1.sum() < len(b1)  # a non-trivial case
  # Broken samples are really misclassified at the returned point.
  wrong = np.asarray(jnp.argmax(f(adv4), -1) != labels)
  assert np.all(wrong[b4])
  # Unbroken samples: the loss at the returned point does not decrease.
  both = ~b4
  assert np.all(ce(adv4)[both] >= ce(adv1)[both] - 1e-6)
