"""`cerdeq_jax.checkpointing.Checkpointer`: round trip, configuration check,
corrupt and partial checkpoints, retention (latest k + best)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cerdeq_jax.checkpointing import Checkpointer, IncompatibleCheckpoint
from cerdeq_jax.training import TrainState

CONFIG = {'model': 'cerdeq', 'eps': 0.1, 'width': 4, 'milestones': [15, 18]}


def make_state(seed: int, step: int = 0, sn: bool = True) -> TrainState:
  """A TrainState with the structure of a real one (nested params, BN stats,
  an SN vector, Adam state) but random values, without tracing a model."""
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))
  params = {'deq': {'hidden_kernel': f(3, 3, 4, 4), 'injection': {'kernel': f(3, 3, 1, 4),
                                                                  'bias': f(4)}},
            'BatchNorm_0': {'scale': f(4), 'bias': f(4)},
            'DenseHead_0': {'classifier': {'kernel': f(16, 10), 'bias': f(10)}}}
  batch_stats = {'BatchNorm_0': {'mean': f(4), 'var': jnp.abs(f(4))}}
  spectral = {'deq': {'hidden_kernel': f(4)}} if sn else {}
  tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3))
  opt_state = tx.init(params)
  # Make the optimiser state non-trivial (count, mu, nu all change).
  grads = jax.tree_util.tree_map(lambda p: p * 0.5 + 0.1, params)
  for _ in range(step % 3 + 1):
    _, opt_state = tx.update(grads, opt_state, params)
  return TrainState(jnp.asarray(step, jnp.int32), params, batch_stats, spectral, opt_state)


def assert_states_equal(a: TrainState, b: TrainState):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  assert len(la) > 10
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def step_dirs(directory) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.fixture
def ckpt_dir(tmp_path):
  return str(tmp_path / 'checkpoints')


def test_round_trip_restores_every_leaf(ckpt_dir):
  state = make_state(1, step=7)
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  assert ckpt.latest_step() is None
  assert ckpt.restore(make_state(2)) is None  # nothing saved yet
  ckpt.save(state, 7)
  ckpt.close()
  # A fresh Checkpointer (as after a restart), with a template of other values.
  ckpt = Checkpointer(ckpt_dir, dict(CONFIG))
  assert ckpt.latest_step() == 7
  template = make_state(2, step=0)
  restored = ckpt.restore(template)
  assert_states_equal(restored, state)
  assert int(restored.step) == 7
  # The template's values did not leak in.
  assert not np.array_equal(np.asarray(restored.params['deq']['hidden_kernel']),
                            np.asarray(template.params['deq']['hidden_kernel']))
  ckpt.close()


def test_round_trip_without_spectral_state(ckpt_dir):
  state = make_state(3, step=2, sn=False)
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  ckpt.save(state, 2)
  assert_states_equal(ckpt.restore(make_state(4, sn=False)), state)
  ckpt.close()


@pytest.mark.parametrize('change', [{'eps': 0.2}, {'width': 8}, {'extra': 1}])
def test_other_configuration_is_refused(ckpt_dir, change):
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  ckpt.save(make_state(1, step=5), 5)
  ckpt.close()
  other = Checkpointer(ckpt_dir, {**CONFIG, **change})
  with pytest.raises(IncompatibleCheckpoint) as info:
    other.restore(make_state(2))
  message = str(info.value)
  assert '\n' not in message
  assert list(change)[0] in message and 'step 5' in message
  other.close()
  # The same configuration (a fresh dict, keys in another order) is accepted.
  same = Checkpointer(ckpt_dir, dict(reversed(list(CONFIG.items()))))
  assert int(same.restore(make_state(2)).step) == 5
  same.close()


def _corrupt(folder: str) -> int:
  """Overwrites every file under ``folder`` with garbage; returns how many."""
  count = 0
  for root, _, files in os.walk(folder):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'\x00garbage')
      count += 1
  return count


@pytest.mark.parametrize('what', ['state', 'config', 'both'])
def test_corrupt_newest_checkpoint_falls_back(ckpt_dir, what):
  old, new = make_state(1, step=3), make_state(2, step=6)
  ckpt = Checkpointer(ckpt_dir, CONFIG, keep=3)
  ckpt.save(old, 3)
  ckpt.save(new, 6)
  ckpt.close()
  items = ['state', 'config'] if what == 'both' else [what]
  for item in items:
    assert _corrupt(os.path.join(ckpt_dir, '6', item)) > 0
  ckpt = Checkpointer(ckpt_dir, CONFIG, keep=3)
  restored = ckpt.restore(make_state(9))
  assert restored is not None
  assert_states_equal(restored, old)
  ckpt.close()


def test_truncated_state_files_fall_back(ckpt_dir):
  old, new = make_state(1, step=1), make_state(2, step=2)
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  ckpt.save(old, 1)
  ckpt.save(new, 2)
  ckpt.close()
  truncated = 0
  for root, _, files in os.walk(os.path.join(ckpt_dir, '2', 'state')):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 1:
        os.truncate(path, size // 2)
        truncated += 1
  assert truncated > 0
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  assert_states_equal(ckpt.restore(make_state(9)), old)
  ckpt.close()


def test_all_checkpoints_corrupt_gives_none(ckpt_dir):
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  ckpt.save(make_state(1, step=1), 1)
  ckpt.close()
  _corrupt(os.path.join(ckpt_dir, '1', 'state'))
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  assert ckpt.restore(make_state(9)) is None
  ckpt.close()


def test_partial_write_is_not_a_checkpoint(ckpt_dir):
  """A leftover ``<step>.orbax-checkpoint-tmp-*`` folder (a save killed before
  its rename) is neither listed nor restored, and is cleaned up."""
  good = make_state(1, step=4)
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  ckpt.save(good, 4)
  ckpt.close()
  # Simulate a killed save of step 8: a copy of a real checkpoint, unrenamed
  # and half-written.
  import shutil
  tmp = os.path.join(ckpt_dir, '8.orbax-checkpoint-tmp-1234567890')
  shutil.copytree(os.path.join(ckpt_dir, '4'), tmp)
  _corrupt(os.path.join(tmp, 'state'))
  ckpt = Checkpointer(ckpt_dir, CONFIG)
  assert ckpt.latest_step() == 4
  assert ckpt.manager.all_steps() == [4]
  assert_states_equal(ckpt.restore(make_state(9)), good)
  assert not os.path.exists(tmp), 'the unfinished save should have been removed'
  # Saving the same step again works.
  newer = make_state(5, step=8)
  ckpt.save(newer, 8)
  assert ckpt.latest_step() == 8
  assert_states_equal(ckpt.restore(make_state(9)), newer)
  ckpt.close()


def test_keeps_latest_k_and_the_best(ckpt_dir):
  """keep=2 latest steps plus the one with the lowest certified_error (orbax
  BestN keeps the *largest* values of its metric fn, here -certified_error)."""
  ckpt = Checkpointer(ckpt_dir, CONFIG, keep=2)
  errors = {1: 50.0, 2: 30.0, 3: 60.0, 4: 70.0}
  for step, err in errors.items():
    ckpt.save(make_state(step, step=step), step, {'certified_error': err, 'pgd_error': 1.0})
  ckpt.save(make_state(5, step=5), 5)  # a mid-epoch save: no metrics
  assert step_dirs(ckpt_dir) == [2, 4, 5]
  # The best stays when newer (worse) ones push it out of the latest k.
  ckpt.save(make_state(6, step=6), 6, {'certified_error': 40.0})
  ckpt.save(make_state(7, step=7), 7)
  assert step_dirs(ckpt_dir) == [2, 6, 7]
  # A better one replaces it.
  ckpt.save(make_state(8, step=8), 8, {'certified_error': 10.0})
  ckpt.save(make_state(9, step=9), 9)
  ckpt.save(make_state(10, step=10), 10)
  assert step_dirs(ckpt_dir) == [8, 9, 10]
  assert ckpt.manager.all_steps() == [8, 9, 10]
  # restore gives the latest, not the best.
  assert int(ckpt.restore(make_state(0)).step) == 10
  ckpt.close()


def test_keep_one_keeps_latest_and_best(ckpt_dir):
  ckpt = Checkpointer(ckpt_dir, CONFIG, keep=1)
  for step, err in [(1, 20.0), (2, 80.0), (3, 90.0)]:
    ckpt.save(make_state(step, step=step), step, {'certified_error': err})
  assert step_dirs(ckpt_dir) == [1, 3]
  ckpt.close()
