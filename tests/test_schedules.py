"""`cerdeq_jax.schedules` against the Fast-IBP recipe (brief §6).

The reference for the ε ramp is the ``SmoothedScheduler`` of auto_LiRPA (used
by Fast-IBP), rewritten here from its formula in steps: exponent ``beta`` up
to the mid step (a whole step: ``int(length_steps * mid) + init_step``), then
linear, with matching value and slope; ε = 0 up to ``init_step`` included.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cerdeq_jax import schedules

SPE = 100          # steps per epoch
START, LENGTH = 1, 20  # epochs
EPS = 8 / 255


def eps_at(step):
  return float(schedules.epsilon(step, EPS, SPE, START, LENGTH))


def smoothed_scheduler(step, init_step, end_step, final, mid_point=0.25, beta=4.0):
  """auto_LiRPA's SmoothedScheduler, from 0 to ``final`` (float64)."""
  mid_step = int((end_step - init_step) * mid_point) + init_step
  t = (mid_step - init_step) ** (beta - 1.0)
  alpha = final / ((end_step - mid_step) * beta * t + (mid_step - init_step) * t)
  mid_value = alpha * (mid_step - init_step) ** beta
  if step <= init_step:
    return 0.0
  if step < mid_step:
    return alpha * (step - init_step) ** beta
  return min(mid_value + (final - mid_value) * (step - mid_step) / (end_step - mid_step), final)


def test_epsilon_zero_before_start_and_max_after_ramp():
  assert eps_at(0) == 0.0
  assert eps_at(START * SPE - 1) == 0.0
  assert eps_at(START * SPE) == 0.0
  assert eps_at(START * SPE + 1) > 0.0
  end = (START + LENGTH) * SPE
  np.testing.assert_allclose(eps_at(end), EPS, rtol=1e-6)
  np.testing.assert_allclose(eps_at(end + 5000), EPS, rtol=1e-6)
  assert eps_at(end - 1) < EPS


def test_epsilon_matches_the_smoothed_scheduler():
  init, end = START * SPE, (START + LENGTH) * SPE
  for step in [0, 50, 100, 101, 150, 300, 599, 600, 601, 1000, 1999, 2100, 2500]:
    np.testing.assert_allclose(eps_at(step), smoothed_scheduler(step, init, end, EPS),
                               rtol=1e-5, atol=1e-9, err_msg=f'step {step}')


def test_epsilon_mid_step_is_a_whole_step():
  """21 ramp steps: the published mid step is int(21 * 0.25) = 5 steps in,
  not 5.25, and alpha follows from it."""
  spe, start, length = 7, 1, 3
  init, end = start * spe, (start + length) * spe
  got = lambda step: float(schedules.epsilon(step, EPS, spe, start, length))
  for step in range(0, end + 3):
    np.testing.assert_allclose(got(step), smoothed_scheduler(step, init, end, EPS),
                               rtol=1e-5, atol=1e-12, err_msg=f'step {step}')
  # By hand: m = 5/21; alpha * 21^4 = 1 / (m^3 (4 - 4m + m)); at the mid step
  # ε = eps * m^4 * that = eps * m / (4 - 3m).
  m = 5 / 21
  np.testing.assert_allclose(got(init + 5), EPS * m / (4 - 3 * m), rtol=1e-5)
  assert schedules.mid_fraction(spe, length) == m
  # A ramp too short for a mid step (3 * 0.25 < 1) is linear.
  np.testing.assert_allclose(float(schedules.epsilon(2, EPS, 1, 0, 3)), EPS * 2 / 3, rtol=1e-6)


def test_epsilon_mid_point_value():
  mid = START * SPE + 0.25 * LENGTH * SPE  # step 600
  # Value at the mid-point: m / (beta (1 - m) + m) of eps_max (m = 0.25, beta = 4).
  np.testing.assert_allclose(eps_at(mid), EPS * 0.25 / (4 * 0.75 + 0.25), rtol=1e-5)
  np.testing.assert_allclose(float(schedules.smooth_ramp(0.25)), 1 / 13, rtol=1e-6)
  np.testing.assert_allclose(float(schedules.smooth_ramp(0.0)), 0.0)
  np.testing.assert_allclose(float(schedules.smooth_ramp(1.0)), 1.0, rtol=1e-6)


def test_epsilon_continuous_with_continuous_derivative_at_mid_point():
  mid = 600
  h = 2
  left = (eps_at(mid) - eps_at(mid - h)) / h
  right = (eps_at(mid + h) - eps_at(mid)) / h
  # Analytic slope of the linear part: (1 - 1/13) / (0.75 * length) per step.
  slope = EPS * (1 - 1 / 13) / (0.75 * LENGTH * SPE)
  np.testing.assert_allclose(right, slope, rtol=1e-3)
  # One-sided difference of a t^4 curve lags by f'' h / 2: ~1% here. A kink
  # (e.g. a plain quartic to the end, slope 4x) would be far outside.
  np.testing.assert_allclose(left, slope, rtol=0.02)
  assert abs(left - right) < 0.02 * slope
  # Continuity: the jump across the mid-point is of the order of slope * step.
  assert abs(eps_at(mid + 1e-3) - eps_at(mid - 1e-3)) < 1e-2 * slope + 1e-9
  # Derivative of smooth_ramp by autodiff, both sides of the mid point.
  d = jax.grad(lambda t: schedules.smooth_ramp(t))
  np.testing.assert_allclose(d(0.25 - 1e-4), d(0.25 + 1e-4), rtol=2e-3)


def test_epsilon_monotone_non_decreasing():
  steps = np.arange(0, (START + LENGTH + 2) * SPE)
  values = np.asarray(jax.vmap(lambda s: schedules.epsilon(s, EPS, SPE, START, LENGTH))(steps))
  assert np.all(np.diff(values) >= 0)
  assert values[0] == 0 and values[-1] == pytest.approx(EPS)


def test_kappa_endpoints():
  k = lambda s: float(schedules.kappa(s, SPE, START, LENGTH, 1.0, 0.5))
  assert k(0) == 1.0 and k(START * SPE) == 1.0
  np.testing.assert_allclose(k((START + LENGTH) * SPE), 0.5)
  np.testing.assert_allclose(k(10_000), 0.5)
  np.testing.assert_allclose(k(START * SPE + LENGTH * SPE // 2), 0.75, rtol=1e-6)


def test_learning_rate_drops_at_milestones():
  lr = schedules.learning_rate(5e-4, SPE, (50, 60))
  np.testing.assert_allclose(lr(0), 5e-4)
  np.testing.assert_allclose(lr(50 * SPE - 1), 5e-4)
  np.testing.assert_allclose(lr(50 * SPE), 5e-4 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(lr(60 * SPE - 1), 5e-4 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(lr(60 * SPE), 5e-4 * 0.04, rtol=1e-6)
  np.testing.assert_allclose(lr(70 * SPE), 5e-4 * 0.04, rtol=1e-6)


def _adam_by_hand(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
  m = v = 0.0
  updates = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    updates.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
  return updates


def _clip(g, max_norm):
  norm = np.sqrt(sum(np.sum(x ** 2) for x in g))
  return [x * min(1.0, max_norm / norm) for x in g]


def test_optimizer_clips_global_norm_at_10():
  lr = 1e-3
  tx = schedules.optimizer(lr)
  params = {'a': jnp.zeros(3), 'b': jnp.zeros((2, 2))}
  # A huge gradient (norm 2e6), then a small one (norm ~1). Adam's first
  # update is scale invariant, the second is not: it tells whether the first
  # gradient was clipped to norm 10.
  g1 = [np.array([1e6, -1e6, 5e5]), np.array([[1e6, 0.0], [-5e5, 1e6]])]
  g2 = [np.array([0.3, 0.2, -0.5]), np.array([[0.1, -0.4], [0.6, 0.2]])]
  state = tx.init(params)
  got = []
  for g in (g1, g2):
    grads = {'a': jnp.asarray(g[0], jnp.float32), 'b': jnp.asarray(g[1], jnp.float32)}
    upd, state = tx.update(grads, state, params)
    got.append([np.asarray(upd['a']), np.asarray(upd['b'])])
  clipped = [_clip(g1, 10.0), _clip(g2, 10.0)]
  assert np.sqrt(sum(np.sum(x ** 2) for x in clipped[0])) == pytest.approx(10.0)
  for i in range(2):  # leaf by leaf, Adam on the clipped gradients
    ref = _adam_by_hand([clipped[0][i], clipped[1][i]], lr)
    for step in range(2):
      np.testing.assert_allclose(got[step][i], ref[step], rtol=1e-4, atol=1e-9)
  # Without clipping the second update would be different.
  unclipped = _adam_by_hand([g1[0], g2[0]], lr)[1]
  assert np.max(np.abs(unclipped - got[1][0])) > 1e-5
  # A gradient below the threshold is left alone.
  small = [np.array([1.0, 2.0, 2.0]), np.zeros((2, 2))]
  assert np.allclose(_clip(small, 10.0)[0], small[0])
  upd, _ = tx.update({'a': jnp.asarray(small[0], jnp.float32), 'b': jnp.zeros((2, 2))},
                     tx.init(params), params)
  np.testing.assert_allclose(upd['a'], _adam_by_hand([small[0]], lr)[0], rtol=1e-4)


def test_optimizer_accepts_the_lr_schedule():
  lr = schedules.learning_rate(1.0, 1, (1,))  # 1.0, then 0.2 from step 1
  tx = schedules.optimizer(lr)
  params = jnp.zeros(2)
  state = tx.init(params)
  g = jnp.array([1.0, -1.0])
  u1, state = tx.update(g, state, params)
  u2, state = tx.update(g, state, params)
  # Adam with a constant gradient: |update| = lr (up to eps).
  np.testing.assert_allclose(np.abs(u1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.abs(u2), 0.2, rtol=1e-4)
