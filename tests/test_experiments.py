"""End to end: ``python -m experiments.fashion_mnist`` on tiny IDX files.

The module fixture ``runs`` trains run A uninterrupted (2 epochs of 8 steps,
a checkpoint every 2 steps), then, while side runs on copies of A's workdir
check the refusals and --eval_only, runs B with the same flags through a
SIGKILL, a resume stopped by SIGTERM, and a final resume.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers_training as h

# The schedule is pinned (epoch 0 at ε = 0), not the experiment's defaults.
FLAGS = ['--epochs=2', '--batch_size=32', '--width=4', '--dense=16', '--pgd_steps=2',
         '--progress=false', '--checkpoint_every_steps=2', '--eps_start_epochs=1',
         '--eps_length_epochs=5', '--milestones=7']
STEPS = 16           # 256 examples / 32 = 8 steps per epoch, 2 epochs
TIMEOUT = 400


# --- running the CLI -------------------------------------------------------------

def start(args, env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, '-m', 'experiments.fashion_mnist'] + list(args),
                          cwd=h.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> dict:
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f'timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}')
  return {'rc': proc.returncode, 'out': out, 'err': err}


def describe(result: dict) -> str:
  return f"rc={result['rc']}\nstdout:\n{result['out'][-3000:]}\nstderr:\n{result['err'][-5000:]}"


def must_succeed(result: dict) -> dict:
  assert result['rc'] == 0, describe(result)
  assert 'Traceback' not in result['err'], describe(result)
  return result


def step_dirs(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def wait_for_step(proc: subprocess.Popen, workdir, minimum: int, timeout: float = TIMEOUT) -> int:
  """Polls until a finished checkpoint folder >= ``minimum`` exists; returns it."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [s for s in step_dirs(workdir) if s >= minimum]
    if steps:
      return steps[0]
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f'run ended (rc={proc.returncode}) before checkpoint step {minimum}:\n'
                  f'{out[-3000:]}\n{err[-3000:]}')
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f'no checkpoint step >= {minimum} after {timeout}s')


def restore_arrays(workdir, step: int) -> dict:
  """The saved TrainState of ``step`` as flat numpy arrays (no template)."""
  import flax
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  tree = ocp.StandardCheckpointer().restore(path)
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in flax.traverse_util.flatten_dict(tree).items()}


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_results(workdir) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


ERRORS = ('standard_error', 'pgd_error', 'certified_error')


# --- fixtures -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory, data_dir, env):
  tmp = tmp_path_factory.mktemp('runs')
  base = FLAGS + [f'--data_dir={data_dir}']
  rec = {'tmp': tmp}

  # A: uninterrupted.
  a = str(tmp / 'A')
  rec['A'] = must_succeed(finish(start(base + [f'--workdir={a}'], env)))
  rec['A_dir'] = a
  rec['A_results'] = read_results(a)

  # Side runs on copies of A, concurrently with B.
  # Each gets its own copy of the compilation cache: JAX writes cache entries
  # non-atomically, and a concurrent reader of a half-written one would print
  # a warning (the refusals must print exactly one line).
  side, side_env = {}, {}
  for name in ('other_eps', 'no_resume', 'eval_only', 'eval_tol'):
    shutil.copytree(a, str(tmp / name))
    cache = str(tmp / f'cache_{name}')
    shutil.copytree(env['JAX_COMPILATION_CACHE_DIR'], cache)
    side_env[name] = {**env, 'JAX_COMPILATION_CACHE_DIR': cache}
  side['other_eps'] = start(base + [f'--workdir={tmp / "other_eps"}', '--resume', '--eps=0.2'],
                            side_env['other_eps'])
  side['no_resume'] = start(base + [f'--workdir={tmp / "no_resume"}'], side_env['no_resume'])
  side['eval_only'] = start(base + [f'--workdir={tmp / "eval_only"}', '--eval_only'],
                            side_env['eval_only'])
  side['eval_tol'] = start(base + [f'--workdir={tmp / "eval_tol"}', '--eval_only',
                                   '--eval_tol=1e-7'], side_env['eval_tol'])

  # B1: SIGKILL once a checkpoint beyond the first one exists (mid-epoch 1).
  b = str(tmp / 'B')
  rec['B_dir'] = b
  proc = start(base + [f'--workdir={b}'], env)
  rec['B1_seen'] = wait_for_step(proc, b, 4)
  proc.send_signal(signal.SIGKILL)
  rec['B1'] = finish(proc)
  rec['B1_steps'] = step_dirs(b)
  rec['B1_metrics_exists'] = os.path.exists(os.path.join(b, 'metrics.jsonl'))
  rec['B1_results_exists'] = os.path.exists(os.path.join(b, 'results.json'))

  # B2: resume, SIGTERM once it has saved a checkpoint of its own.
  resumed_from = max(rec['B1_steps'])
  proc = start(base + [f'--workdir={b}', '--resume'], env)
  rec['B2_seen'] = wait_for_step(proc, b, resumed_from + 1)
  proc.send_signal(signal.SIGTERM)
  rec['B2'] = finish(proc)
  rec['B2_from'] = resumed_from
  rec['B2_steps'] = step_dirs(b)
  rec['B2_results_exists'] = os.path.exists(os.path.join(b, 'results.json'))

  # B3: resume to the end.
  rec['B3'] = finish(start(base + [f'--workdir={b}', '--resume'], env))

  for name, proc in side.items():
    rec[name] = finish(proc)
  rec['side_dirs'] = {name: str(tmp / name) for name in side}
  print(f"B1 killed after step {rec['B1_seen']} (checkpoints {rec['B1_steps']}); B2 resumed "
        f"from {rec['B2_from']}, SIGTERM after step {rec['B2_seen']} (checkpoints "
        f"{rec['B2_steps']})")
  return rec


# --- bad flags: one line, no traceback, before any work ------------------------------

def _one_error_line(result: dict) -> str:
  assert result['rc'] != 0, describe(result)
  assert 'Traceback' not in result['err'] + result['out'], describe(result)
  lines = [l for l in result['err'].splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), describe(result)
  return lines[0]



# Runs the module with `jax` made unimportable: a flag error must be reported
# before anything heavy is imported (let alone trained).
_NO_JAX = ("import sys, runpy; sys.modules['jax'] = None; "
           "runpy.run_module('experiments.fashion_mnist', run_name='__main__', alter_sys=True)")


def _bad_flag_cases(tmp, data_dir):
  blocker = tmp / 'a_file'
  blocker.write_text('not a folder')
  work = str(tmp / 'work')
  ok = [f'--data_dir={data_dir}', f'--workdir={work}']
  cases = {
      'eps_text': (['--eps=abc'] + ok, "'abc'"),
      'eps_negative': (['--eps=-1'] + ok, '[0, 1]'),
      'eps_too_big': (['--eps=2'] + ok, '[0, 1]'),
      'eps_zero_division': (['--eps=1/0'] + ok, '1/0'),
      'eps_nan': (['--eps=nan'] + ok, 'nan'),
      'model': (['--model=nope'] + ok, 'nope'),
      'batch_size': (['--batch_size=0'] + ok, 'batch_size'),
      'anderson_memory': (['--anderson_memory=0'] + ok, 'anderson_memory'),
      'deq_param_mode': (['--deq_param_mode=both'] + ok, 'deq_param_mode'),
      'deq_bound': (['--deq_bound=frobenius'] + ok, 'deq_bound'),
      'milestones': (['--milestones=1,soon'] + ok, '--milestones=1,soon must be numbers'),
      'tail_strides': (['--tail_strides=2,1.5'] + ok, '--tail_strides=2,1.5 must be integers'),
      'workdir_unwritable': ([f'--data_dir={data_dir}', f'--workdir={blocker}/sub'],
                             'cannot be written'),
      'data_dir_missing': ([f'--data_dir={tmp}/no_such_dir', f'--workdir={work}'], 'no_such_dir'),
      'extra_argument': (ok + ['stray'], 'stray'),
  }
  assert sorted(cases) == sorted(BAD_FLAG_CASES)
  return cases


BAD_FLAG_CASES = ('eps_text', 'eps_negative', 'eps_too_big', 'eps_zero_division', 'eps_nan',
                  'model', 'batch_size', 'anderson_memory', 'deq_param_mode', 'deq_bound',
                  'milestones', 'tail_strides', 'workdir_unwritable',
                  'data_dir_missing', 'extra_argument')


@pytest.mark.parametrize('case', BAD_FLAG_CASES)
def test_bad_flags_fail_fast_with_one_line(tmp_path, data_dir, env, case):
  args, fragment = _bad_flag_cases(tmp_path, data_dir)[case]
  t0 = time.time()
  result = subprocess.run([sys.executable, '-c', _NO_JAX] + args, cwd=h.REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  elapsed = time.time() - t0
  line = _one_error_line({'rc': result.returncode, 'out': result.stdout, 'err': result.stderr})
  assert fragment in line, line
  # Nothing was started: no checkpoints, no metrics, and quickly.
  assert not os.path.exists(tmp_path / 'work' / 'checkpoints')
  assert not os.path.exists(tmp_path / 'work' / 'metrics.jsonl')
  assert elapsed < 60


def test_unknown_flag_is_absl_one_liner(tmp_path, data_dir, env):
  result = subprocess.run(
      [sys.executable, '-c', _NO_JAX, '--no_such_flag=1', f'--data_dir={data_dir}',
       f'--workdir={tmp_path / "work"}'], cwd=h.REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr + result.stdout
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert lines and lines[0].startswith('FATAL Flags parsing error'), result.stderr
  assert 'no_such_flag' in lines[0]
  assert not os.path.exists(tmp_path / 'work')


def test_default_workdir_is_a_function_of_the_flags():
  from experiments.common import Config, default_workdir
  assert default_workdir(Config(dataset='cifar10', model='cerdeq', eps=8 / 255)) == os.path.join(
      'runs', 'cifar10_cerdeq_eps8-255_seed0')
  assert default_workdir(Config(dataset='fashion_mnist', model='cnn7', eps=0.1, seed=2)) == (
      os.path.join('runs', 'fashion_mnist_cnn7_eps0.1_seed2'))


def test_without_workdir_the_default_is_printed_and_used(tmp_path, data_dir, env):
  # --eval_only in a fresh folder: the default workdir (relative to the
  # current folder) is created, printed first, and searched for checkpoints.
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.fashion_mnist', '--eval_only', f'--data_dir={data_dir}']
      + FLAGS, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
  workdir = tmp_path / 'runs' / 'fashion_mnist_cerdeq_eps0.1_seed0'
  assert result.stdout.startswith(f'workdir: {workdir} (default'), result.stdout
  line = _one_error_line({'rc': result.returncode, 'out': result.stdout, 'err': result.stderr})
  assert f'no checkpoint to evaluate in {workdir}' in line, line


@pytest.mark.parametrize('module, message', [('cifar10', 'CIFAR-10 not found'),
                                             ('tiny_imagenet', 'Tiny-ImageNet not found')])
def test_missing_data_is_one_line_without_tfds_warnings(tmp_path, env, module, message):
  # As typed in the README (no --workdir); tfds used to warn about empty
  # version folders in front of the error. HOME: no ~/tensorflow_datasets.
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = subprocess.run(
      [sys.executable, '-m', f'experiments.{module}', '--eps=8/255', f'--data_dir={empty}'],
      cwd=tmp_path, env=dict(env, HOME=str(tmp_path)), capture_output=True, text=True,
      timeout=TIMEOUT)
  line = _one_error_line({'rc': result.returncode, 'out': result.stdout, 'err': result.stderr})
  assert message in line, line


# --- a full run ------------------------------------------------------------------------

@pytest.mark.slow
def test_full_run_writes_metrics_results_and_plots(runs):
  a = runs['A_dir']
  records = read_metrics(a)
  assert [r['epoch'] for r in records] == [0, 1]
  assert [r['step'] for r in records] == [8, 16]
  for r in records:
    for key in ('eps', 'lr', 'time_s', 'train_loss', 'train_accuracy', 'test_examples',
                'test_standard_error', 'test_pgd_error', 'test_certified_error',
                'test_certified_but_broken'):
      assert key in r, (key, sorted(r))
    assert r['test_certified_error'] >= r['test_pgd_error'] >= r['test_standard_error']
    assert r['test_certified_but_broken'] == 0
  # Epoch 1 is on the ε ramp (certified steps), epoch 0 is the ε = 0 warm-up;
  # both are regularised (Fast-IBP), so both run bounds (epoch 0 at ε = 1e-6).
  assert records[0]['eps'] == 0 and records[1]['eps'] > 0
  for r in records:
    assert 'train_robust_loss' in r and r['train_regulariser'] > 0, sorted(r)

  res = runs['A_results']
  for key in ERRORS:
    assert 0 <= res[key] <= 100
  assert res['certified_error'] >= res['pgd_error'] >= res['standard_error']
  assert res['certified_but_broken'] == 0
  assert res['examples'] == 64 and res['steps'] == STEPS and res['eps'] == pytest.approx(0.1)
  assert res['model'] == 'cerdeq' and res['config']['width'] == 4
  # CerDEQ's hidden kernel is Björck-orthogonal (equal singular values), scaled.
  sv = np.asarray(res['hidden_singular_values'])
  assert sv.shape == (4,) and np.allclose(sv, sv[0], rtol=1e-2)
  assert 'certified error' in runs['A']['out']
  for name in ('training_curves.png', 'errors_per_epoch.png'):
    path = os.path.join(a, name)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name
    assert os.path.getsize(path) > 5000
  # The final checkpoint is kept.
  assert STEPS in step_dirs(a)


# --- interruption and resumption -------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_epoch_leaves_a_resumable_run(runs):
  assert runs['B1']['rc'] == -signal.SIGKILL, describe(runs['B1'])
  assert runs['B1_seen'] >= 4
  # Killed inside epoch 1: no epoch finished, nothing final written.
  assert not runs['B1_metrics_exists'] and not runs['B1_results_exists']
  assert max(runs['B1_steps']) < 8
  assert all(s % 2 == 0 for s in runs['B1_steps'])


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_a_checkpoint(runs):
  b2 = runs['B2']
  must_succeed(b2)
  assert f"starting at step {runs['B2_from']}" in b2['out'], b2['out']
  stopped = [l for l in b2['out'].splitlines() if l.startswith('stopped at step ')]
  assert len(stopped) == 1, b2['out']
  step = int(stopped[0].split()[3].rstrip(';'))
  assert runs['B2_from'] < step < STEPS
  assert step in runs['B2_steps']
  assert not runs['B2_results_exists']


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(runs):
  b3 = must_succeed(runs['B3'])
  stopped_at = max(runs['B2_steps'])
  assert f'starting at step {stopped_at}' in b3['out'], b3['out']
  a, b = runs['A_dir'], runs['B_dir']
  final_a, final_b = restore_arrays(a, STEPS), restore_arrays(b, STEPS)
  assert sorted(final_a) == sorted(final_b) and len(final_a) > 20
  assert int(final_a['step']) == int(final_b['step']) == STEPS
  for key in final_a:
    np.testing.assert_allclose(final_b[key], final_a[key], rtol=1e-6, atol=1e-7, err_msg=key)
  # Same evaluation at every epoch end and at the end.
  ra, rb = read_results(a), read_results(b)
  for key in ERRORS + ('certified_but_broken', 'examples', 'steps'):
    assert rb[key] == ra[key], key
  ma, mb = read_metrics(a), read_metrics(b)
  assert [r['epoch'] for r in mb] == [0, 1]
  for x, y in zip(ma, mb):
    for key in x:
      if (key.startswith('test_') and not key.endswith('time_s')) or key in (
          'epoch', 'step', 'eps', 'lr'):
        assert y[key] == pytest.approx(x[key], rel=1e-6), key


# --- refusals and --eval_only -------------------------------------------------------

@pytest.mark.slow
def test_resume_with_other_eps_is_refused(runs):
  line = _one_error_line(runs['other_eps'])
  assert 'eps' in line and '0.1' in line and '0.2' in line, line
  # The checkpoints are untouched.
  assert step_dirs(runs['side_dirs']['other_eps']) == step_dirs(runs['A_dir'])


@pytest.mark.slow
def test_start_without_resume_over_checkpoints_is_refused(runs):
  line = _one_error_line(runs['no_resume'])
  assert '--resume' in line, line
  workdir = runs['side_dirs']['no_resume']
  assert step_dirs(workdir) == step_dirs(runs['A_dir'])
  assert read_metrics(workdir) == read_metrics(runs['A_dir'])


@pytest.mark.slow
def test_eval_only_reproduces_results(runs):
  must_succeed(runs['eval_only'])
  workdir = runs['side_dirs']['eval_only']
  again, original = read_results(workdir), runs['A_results']
  for key in ERRORS + ('certified_but_broken', 'examples', 'steps'):
    assert again[key] == original[key], key
  # No training happened: the checkpoints and metrics are those of A.
  assert step_dirs(workdir) == step_dirs(runs['A_dir'])
  assert read_metrics(workdir) == read_metrics(runs['A_dir'])


def test_resume_keeps_the_metrics_written_up_to_its_step(tmp_path):
  from experiments import run_files
  path = run_files.workdir_path(str(tmp_path)) / run_files.METRICS
  # 3.5 epochs of 10 steps: records at the epoch ends and at the run's end
  records = [{'epoch': e, 'step': s} for e, s in enumerate((10, 20, 30, 35))]
  run_files.write_metrics(path, records)
  run_files.truncate_metrics(path, 35)   # --eval_only, or --resume of a finished run
  assert run_files.read_metrics(path) == records
  run_files.truncate_metrics(path, 24)   # resumed from a checkpoint in epoch 2
  assert run_files.read_metrics(path) == records[:2]


def test_evaluation_solves_to_eval_tol_not_the_training_tol(runs):
  # Training solves to --tol (1e-3 for Fashion-MNIST); evaluation to
  # --eval_tol, which --eval_only may change without retraining.
  assert runs['A_results']['config']['tol'] == 1e-3
  assert 0 < runs['A_results']['deq_residual_max'] <= 1e-5  # the default --eval_tol
  must_succeed(runs['eval_tol'])
  tight = read_results(runs['side_dirs']['eval_tol'])
  assert tight['deq_converged'] == 100 and 0 < tight['deq_residual_max'] <= 1e-7
  assert tight['certified_but_broken'] == 0
  assert tight['certified_error'] >= tight['pgd_error'] >= tight['standard_error']


# --- validation split, fractional budgets, step calibration ---------------------------

@pytest.mark.slow
def test_validation_run_with_a_fractional_last_epoch(tmp_path, data_dir, env):
  # 256 - 64 held out = 192 training images = 6 steps of 32; 1.5 epochs = 9 steps.
  work = str(tmp_path / 'val')
  must_succeed(finish(start(FLAGS + [f'--data_dir={data_dir}', f'--workdir={work}',
                                     '--validation_examples=64', '--epochs=1.5'], env)))
  results = read_results(work)
  assert results['split'] == 'validation' and results['examples'] == 64
  assert results['steps'] == 9
  assert [(r['epoch'], r['step']) for r in read_metrics(work)] == [(0, 6), (1, 9)]
  assert results['standard_error'] <= results['pgd_error'] <= results['certified_error']
  assert results['certified_but_broken'] == 0


@pytest.mark.slow
@pytest.mark.parametrize('method', ['ibp', 'crown_ibp'])
def test_calibrate_prints_the_step_time_and_trains_nothing(tmp_path, data_dir, env, method):
  work = tmp_path / 'cal'
  model = ['--model=cnn7', '--method=crown_ibp'] if method == 'crown_ibp' else []
  out = must_succeed(finish(start(FLAGS + model + [f'--data_dir={data_dir}', f'--workdir={work}',
                                                   '--calibrate'], env)))
  timing = json.loads(out['out'].strip().splitlines()[-1])
  assert timing['steps_per_epoch'] == 8 and 0 < timing['seconds_per_step'] < 60
  # CROWN-IBP's ramp steps are timed too (the study prices them apart)
  assert ('seconds_per_crown_step' in timing) == (method == 'crown_ibp')
  assert not os.path.exists(work / 'checkpoints') and not os.path.exists(work / 'metrics.jsonl')


def test_study_budget_is_minutes_over_step_time():
  from experiments import study
  flags_ = dict(f.lstrip('-').split('=') for f in study.budget_flags(
      10, {'seconds_per_step': 0.5}, 100))
  epochs = float(flags_['epochs'])
  assert epochs == 12  # 600 s / 0.5 s = 1200 steps = 12 epochs of 100 steps
  assert float(flags_['eps_start_epochs']) == pytest.approx(study.SCHEDULE['eps_start'] * 12)
  assert float(flags_['eps_length_epochs']) == pytest.approx(study.SCHEDULE['eps_length'] * 12)
  assert [float(m) for m in flags_['milestones'].split(',')] == pytest.approx(
      [m * 12 for m in study.SCHEDULE['milestones']])


def test_study_budget_prices_crown_ramp_steps_and_scales_the_linf_schedule():
  from experiments import study
  given = lambda *a: dict(f.lstrip('-').split('=') for f in study.budget_flags(*a))
  # CROWN-IBP: N steps, the ramp's half of them at 1.5 s, the rest at 0.5 s: N = 600 / 1.0
  crown = given(10, {'seconds_per_step': 0.5, 'seconds_per_crown_step': 1.5}, 100)
  assert float(crown['epochs']) == 6 and float(crown['eps_length_epochs']) == 3
  linf = given(10, {'seconds_per_step': 0.5}, 100, ['--model=linf_dist', '--width=64'])
  assert float(linf['epochs']) == 12 and 'milestones' not in linf
  assert [float(e) for e in linf['p_epochs'].split(',')] == [1.5, 10.5]  # 50/400, 350/400
  mlp = given(10, {'seconds_per_step': 0.5}, 100, ['--model=linf_dist_mlp'])
  assert float(mlp['eps_length_epochs']) == 1.5  # 50 of 400 epochs


def test_main_job_is_the_main_plans_cerdeq_run():
  """`make demo` (the experiment's defaults) and `study --plan=main` seed 0 of
  the CerDEQ variant chosen on validation (by the committed results) are one run."""
  from experiments import fashion_mnist, report, study
  results = report.load(os.path.join(h.REPO, 'docs', 'results'))
  chosen = report.chosen_cerdeq({p: report.summarize(r) for p, r in results.items()})
  plan = study.PLANS['main']
  run = next(r for r in plan.runs if r.name == f'{chosen}_s0')
  with open(os.path.join(h.REPO, 'docs', 'results', 'calibration.json')) as f:
    seconds = json.load(f)[' '.join(study.model_flags(run))]['seconds_per_step']
  args = study.run_flags(plan, run) + study.budget_flags(
      plan.minutes, {'seconds_per_step': seconds}, study.steps_per_epoch(plan, run))
  d = fashion_mnist.DEFAULTS
  given = dict(a.lstrip('-').split('=', 1) for a in args if '=' in a)
  assert given.pop('model') == d.model and float(given.pop('eps')) == d.eps
  assert int(given.pop('train_examples')) >= 60000 and d.train_examples is None
  assert given.pop('progress') == 'false'
  assert [float(m) for m in given.pop('milestones').split(',')] == list(d.milestones)
  for name, value in given.items():
    assert type(getattr(d, name))(value) == getattr(d, name), name
  # And the committed run was trained with everything the demo would use,
  # flags not given included (e.g. Anderson's memory, whose default moved).
  from experiments.config import Config
  saved = Config.from_json(results['main'][run.name]['config'])
  assert saved.identity() == dataclasses.replace(d, train_examples=60000).identity()


def test_report_claims_stand_on_the_variant_chosen_on_validation():
  from experiments import report
  # summaries: group -> {metric: (mean, std or None)}; select on validation, main on test
  summaries = {
      'select': {'cerdeq': {'certified_error': (35.6, 0.2)},
                 'cerdeq_reparam_rho': {'certified_error': (34.5, 0.3)}},
      'main': {'cerdeq': {'certified_error': (30.0, 2.0)},
               'cerdeq_reparam_rho': {'certified_error': (31.0, 0.5)},  # worse on test
               'cnn7': {'certified_error': (30.3, 0.8)}}}
  assert report.chosen_cerdeq(summaries) == 'cerdeq_reparam_rho'
  chosen = [l for l in report.claims(summaries) if 'chosen on validation)' in l]
  assert len(chosen) == 1 and 'reparametrised' in chosen[0] and 'not decided' in chosen[0]
  assert report.verdict((28.0, 0.5), (30.3, 0.8)) == 'holds'           # 2.3 > 0.8
  assert report.verdict((31.5, 0.5), (30.3, 0.8)) == 'is reversed'
  assert report.verdict((28.0, None), (30.3, 0.8)).startswith('is not decided (one seed')
  # Claim 2 compares parametrisations at the ablation plan's own budget once
  # the chosen CerDEQ has run there; before that, against the main plan, unjudged.
  summaries['ablation'] = {'deq_wn': {'certified_error': (30.0, 0.1)}}
  (line,) = [l for l in report.claims(summaries) if 'Claim 2' in l]
  assert 'longer budget' in line and '→' not in line
  summaries['ablation']['cerdeq_reparam_rho'] = {'certified_error': (29.0, 0.2)}
  (line,) = [l for l in report.claims(summaries) if 'Claim 2' in l]
  assert 'same budget' in line and '29.00' in line and line.endswith('→ holds.')
  del summaries['select']
  assert report.chosen_cerdeq(summaries) == 'cerdeq'  # no validation evidence: the default


def test_benchmark_out_keeps_the_suites_not_run():
  from experiments.bench_fixtures import merged
  old = {'machine': 'vm', 'command': 'benchmark --suite=all',
         'core': {'a': 1.0}, 'train': {'b': 2.0}}
  now = {'machine': 'vm2', 'command': 'benchmark --suite=train', 'date': 'd', 'load': 0.1}
  out = merged(old, {'train': {'b': 3.0}}, now)
  before = {'machine': 'vm', 'command': 'benchmark --suite=all'}
  assert out == {'core': {'a': 1.0, 'measured': before}, 'train': {'b': 3.0, 'measured': now}}
  assert merged(out, {'deq': {'c': 4.0}}, now)['core'] == out['core']


def test_every_deq_run_of_a_plan_names_its_mode_and_bound():
  # The experiment's defaults moved once (to the validation choice); a plan's
  # runs must not move with them, or its seeds train different layers.
  from experiments import study
  for plan in study.PLANS.values():
    for run in plan.runs:
      model = dict(f.lstrip('-').split('=', 1) for f in run.flags if '=' in f).get('model')
      if model in ('cerdeq', 'deq_sn', 'deq_wn'):
        named = {f.split('=')[0] for f in run.flags}
        assert {'--deq_param_mode', '--deq_bound'} <= named, run.name


@pytest.mark.slow
def test_stop_on_an_epochs_last_step_keeps_that_epochs_record(tmp_path, data_dir, env):
  # A stop (here --stop_after_steps, as a SIGTERM would) on the last step of
  # epoch 0 finishes that epoch first: its metrics record exists, and the
  # resumed run ends with one record per epoch, as an uninterrupted run does.
  work = str(tmp_path / 'C')
  base = FLAGS + [f'--data_dir={data_dir}', f'--workdir={work}']
  first = must_succeed(finish(start(base + [f'--stop_after_steps={STEPS // 2}'], env)))
  assert f'stopped at step {STEPS // 2}' in first['out'], first['out']
  assert [r['step'] for r in read_metrics(work)] == [STEPS // 2]
  assert 'test_certified_error' in read_metrics(work)[0]
  must_succeed(finish(start(base + ['--resume'], env)))
  assert [r['epoch'] for r in read_metrics(work)] == [0, 1]


@pytest.mark.parametrize('devices', [1, 2])
def test_readme_library_example_runs_as_typed(devices):
  """The README's Python example (one batch, then sharded over all devices in
  the user's own jit), as typed: it runs, and its sharded gradient is the
  unsharded one."""
  import re
  from tests import helpers_training
  readme = open(os.path.join(h.REPO, 'README.md'), encoding='utf-8').read()
  example = re.search(r'```python\n(.*?)```', readme, re.S).group(1)
  check = example + '''
import json
lone = jax.grad(lambda params: cj.losses.robust_cross_entropy(net.apply(
    {**variables, 'params': params}, cj.linf_ball(x, 0.1, (0.286,), (0.353,)), labels=y)))(
        variables['params'])
error = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(lone)))
scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree_util.tree_leaves(lone))
print(json.dumps(dict(devices=jax.device_count(), error=error, scale=scale,
                      certified=int(certified.sum()))))
'''
  out = helpers_training.run_on_devices(check, devices=devices)
  assert out['devices'] == devices and 0 <= out['certified'] <= 8
  assert out['error'] <= 1e-5 * out['scale'], out
