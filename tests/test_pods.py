"""Runs as on a pod: several processes, preemption, object storage, device counts.

* ``python -m experiments.fashion_mnist`` as 2 processes (``jax.distributed``
  on localhost, one CPU device each): a SIGTERM to process 1 only stops *both*
  at the same step with a checkpoint (JAX's preemption sync point), and the
  resumed pair ends equal to an uninterrupted pair;
* ``--workdir=gs://bucket/run`` with an offline stand-in for GCS
  (`helpers_object_storage`: fsspec's ``gs`` filesystem and orbax's TensorStore
  paths mapped to a local folder): every file lands in the bucket, none in the
  current folder, and ``--eval_only`` restores from it;
* a global batch that the device count does not divide: one error line.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import helpers_training as h
from test_experiments import (_one_error_line, describe, finish, must_succeed, start, step_dirs,
                              wait_for_step)

# 256 images / 16 = 16 steps, a checkpoint every 2: room to stop in between.
FLAGS = ['--epochs=1', '--batch_size=16', '--width=4', '--dense=16', '--pgd_steps=2',
         '--progress=false', '--checkpoint_every_steps=2', '--eval_examples_per_epoch=32']
STEPS = 16


def start_pair(args, env) -> list[subprocess.Popen]:
  port = h.free_port()
  return [start(args + [f'--coordinator_address=localhost:{port}', '--num_processes=2',
                        f'--process_id={i}'], env) for i in range(2)]


def restore_arrays(workdir, step: int) -> dict:
  """The saved TrainState of ``step`` as flat numpy arrays, restored onto this
  process's one device whatever topology saved it."""
  import flax
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                                  checkpointer.metadata(path).item_metadata)
  tree = checkpointer.restore(path, target)
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(tree).items()}


def stopped_at(result: dict) -> int | None:
  lines = [l for l in result['out'].splitlines() if l.startswith('stopped at step ')]
  assert len(lines) <= 1, describe(result)
  return int(lines[0].split()[3].rstrip(';')) if lines else None


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_exact(tmp_path, data_dir,
                                                                            env):
  base = FLAGS + [f'--data_dir={data_dir}']
  a, b = str(tmp_path / 'A'), str(tmp_path / 'B')
  # A: uninterrupted, 2 processes.
  for result in [finish(p) for p in start_pair(base + [f'--workdir={a}'], env)]:
    must_succeed(result)
  # B: SIGTERM to process 1 once a checkpoint exists; process 0 gets nothing.
  pair = start_pair(base + [f'--workdir={b}'], env)
  seen = wait_for_step(pair[1], b, 2)
  pair[1].send_signal(signal.SIGTERM)
  stopped = [must_succeed(finish(p)) for p in pair]
  steps = [stopped_at(r) for r in stopped]
  assert steps[0] is not None and steps[0] == steps[1], [describe(r) for r in stopped]
  assert seen <= steps[0] < STEPS and steps[0] in step_dirs(b)
  assert not os.path.exists(os.path.join(b, 'results.json'))
  # Resume, 2 processes, to the end.
  resumed = [must_succeed(finish(p)) for p in start_pair(base + [f'--workdir={b}', '--resume'],
                                                         env)]
  assert f'starting at step {steps[0]}' in resumed[0]['out'], resumed[0]['out']
  final_a, final_b = restore_arrays(a, STEPS), restore_arrays(b, STEPS)
  assert sorted(final_a) == sorted(final_b) and int(final_b['step']) == STEPS
  for key in final_a:
    np.testing.assert_allclose(final_b[key], final_a[key], rtol=1e-6, atol=1e-7, err_msg=key)
  results = [json.loads(open(os.path.join(d, 'results.json')).read()) for d in (a, b)]
  for key in ('standard_error', 'pgd_error', 'certified_error', 'examples', 'steps'):
    assert results[1][key] == results[0][key], key
  assert results[0]['devices'] == 2
  # Process 0 alone writes the metrics: one line per epoch.
  for d in (a, b):
    with open(os.path.join(d, 'metrics.jsonl')) as f:
      assert [json.loads(l)['epoch'] for l in f if l.strip()] == [0]


def _on_fake_gcs(root, cwd, args, env):
  helper = os.path.join(h.REPO, 'tests', 'helpers_object_storage.py')
  return subprocess.run([sys.executable, helper, str(root)] + args, cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_workdir_on_object_storage(tmp_path, data_dir, env):
  root, cwd = tmp_path / 'gcs', tmp_path / 'cwd'
  root.mkdir()
  cwd.mkdir()
  args = FLAGS + ['--epochs=0.5', f'--data_dir={data_dir}', '--workdir=gs://bucket/run']
  result = _on_fake_gcs(root, cwd, args, env)
  must_succeed({'rc': result.returncode, 'out': result.stdout, 'err': result.stderr})
  assert result.stdout.startswith('workdir: gs://bucket/run\n'), result.stdout
  run = root / 'bucket' / 'run'
  assert sorted(p.name for p in run.iterdir()) == [
      'checkpoints', 'errors_per_epoch.png', 'metrics.jsonl', 'results.json',
      'training_curves.png']
  assert [json.loads(l)['step'] for l in (run / 'metrics.jsonl').read_text().splitlines()] == [8]
  assert (run / 'training_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert step_dirs(str(run)) == [6, 8]
  results = json.loads((run / 'results.json').read_text())
  assert results['steps'] == 8
  assert os.listdir(cwd) == []  # nothing went through os.* to a local 'gs:' folder
  # Restored from the bucket, the evaluation is the same.
  again = _on_fake_gcs(root, cwd, args + ['--eval_only'], env)
  must_succeed({'rc': again.returncode, 'out': again.stdout, 'err': again.stderr})
  for key in ('standard_error', 'pgd_error', 'certified_error', 'examples', 'steps'):
    assert json.loads((run / 'results.json').read_text())[key] == results[key], key
  assert os.listdir(cwd) == []


def test_batch_not_divisible_by_the_devices_is_one_line(tmp_path, data_dir):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.fashion_mnist', '--batch_size=12',
       f'--data_dir={data_dir}', f'--workdir={tmp_path / "work"}'] + FLAGS[2:],
      cwd=h.REPO, env=h.subprocess_env(devices=8), capture_output=True, text=True, timeout=300)
  line = _one_error_line({'rc': result.returncode, 'out': result.stdout, 'err': result.stderr})
  assert '--batch_size=12' in line and '8 devices' in line, line
  assert not os.path.exists(tmp_path / 'work' / 'checkpoints')


def test_one_process_stops_on_its_own_sigterm_without_the_sync_point():
  import signal as signal_
  from experiments import preemption
  asked = []
  before = signal_.getsignal(signal_.SIGTERM)
  stopper = preemption.Stopper(lambda step: asked.append(step) or True)
  try:
    assert not stopper.should_stop(1)
    os.kill(os.getpid(), signal_.SIGTERM)
    assert stopper.should_stop(2)
  finally:
    stopper.restore()
  assert asked == []  # one process: JAX's sync point is not consulted
  assert signal_.getsignal(signal_.SIGTERM) == before
