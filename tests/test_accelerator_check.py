"""The accelerator check (`experiments.accelerator_check`) without an accelerator.

Its dry run exercises every stage on the CPU at tiny shapes, so the script
is known to work before a GPU/TPU machine is lent to run it for real.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

import helpers_training as h
from experiments import device_checks as dc


def _check(args, tmp_path, timeout=300):
  return subprocess.run([sys.executable, '-m', 'experiments.accelerator_check'] + args,
                        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_leaves_the_docs_alone(tmp_path):
  out, docs = tmp_path / 'check.json', tmp_path / 'performance.md'
  docs.write_text('# Performance\n')
  result = _check(['--dry_run', f'--json_out={out}', f'--docs={docs}'], tmp_path)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report['dry_run'] and report['machine']['platform'] == 'cpu'
  tests = report['tests']
  assert tests['ok'] and 'tests collected' in tests['summary'], tests
  same = report['device_vs_cpu']
  assert same['ok'] and same['counts']['count'] == [16, 16], same
  assert same['max_abs_margin_difference'] == 0 and same['samples_certified_differently'] == 0
  # XLA:CPU recompiles to the same program and runs it deterministically, which
  # the exact resumption of runs (test_experiments, test_pods) relies on.
  assert same['repeatable']['bitwise_equal'] and same['repeatable']['leaves'] > 10, same
  for program in ('eval_step', 'bounds_pass'):  # the precision policy: all HIGHEST
    census = report['precision'][program]
    assert census['total'] == census['dot_general'] + census['convolution'] > 0
    assert census['highest'] == census['total'], census
  train = report['precision']['train_step (default)']  # the layers at DEFAULT
  assert 0 < train['highest'] < train['total'] and report['precision']['ok']
  for model in ('cnn7', 'cerdeq'):
    timing = report['train_steps'][f'{model}_batch8']
    assert timing['natural']['seconds_per_step'] > 0 and timing['certified']['seconds_per_step'] > 0
    assert timing['epochs_200_hours'] == pytest.approx(
        dc.epochs_200_hours(timing['certified']['seconds_per_step'], 8))
    highest = report['train_steps'][f'{model}_batch8_highest']
    assert highest['precision'] == 'highest' and highest['certified_over_default_precision'] == (
        pytest.approx(highest['certified']['seconds_per_step']
                      / timing['certified']['seconds_per_step']))
  for text in ('end equal bit for bit', 'with HIGHEST', '200 epochs'):
    assert text in result.stdout, text
  assert docs.read_text() == '# Performance\n'


def test_without_an_accelerator_the_real_check_refuses(tmp_path):
  result = _check([f'--json_out={tmp_path / "x.json"}'], tmp_path, timeout=120)
  assert result.returncode == 2 and 'pass --dry_run' in result.stderr, result.stderr
  assert not (tmp_path / 'x.json').exists()


def test_replace_section_appends_then_replaces():
  page = '# Performance\n\nText.\n'
  once = dc.replace_section(page, 'figures 1')
  assert once.startswith(page.rstrip('\n')) and once.count(dc.SECTION_BEGIN) == 1
  twice = dc.replace_section(once + '\nAfter.\n', 'figures 2')
  assert 'figures 1' not in twice and 'figures 2' in twice and twice.endswith('After.\n')
  assert twice.count(dc.SECTION_BEGIN) == twice.count(dc.SECTION_END) == 1


def test_precision_census_counts_highest_ops():
  text = '\n'.join([
      '%0 = stablehlo.convolution(%a, %b) {precision_config = [#stablehlo<precision HIGHEST>, '
      '#stablehlo<precision HIGHEST>]}',
      '%1 = stablehlo.dot_general %a, %b, precision = [DEFAULT, DEFAULT]',
      '%2 = stablehlo.dot_general %a, %b, precision = [HIGHEST, HIGHEST]',
      '%3 = stablehlo.add %a, %b'])
  assert dc.precision_census(text) == {'dot_general': 2, 'convolution': 1, 'total': 3,
                                       'highest': 2}


def test_epochs_200_estimate():
  # 50,000 / 128 steps per epoch, 200 epochs, 0.5 s each: 10.85 hours.
  assert dc.epochs_200_hours(0.5, 128) == pytest.approx(50_000 / 128 * 200 * 0.5 / 3600)


def test_compare_evaluations_flags_a_disagreement():
  labels = np.array([0, 1])
  margins = np.array([[0.0, 0.5], [-0.1, 0.0]])
  sums = {'count': 2.0, 'correct': 2.0, 'certified': 1.0, 'pgd_robust': 2.0,
          'certified_but_broken': 0.0}
  run = lambda m, s: {'labels': labels, 'margins': m, 'sums': s}
  assert dc.compare_evaluations(run(margins, sums), run(margins, sums))['ok']
  shifted = dc.compare_evaluations(run(margins - 0.6, sums), run(margins, sums))
  assert not shifted['ok'] and shifted['samples_certified_differently'] == 1
  assert shifted['max_abs_margin_difference'] == pytest.approx(0.6)
  counted = dc.compare_evaluations(run(margins, dict(sums, certified=0.0)), run(margins, sums))
  assert not counted['ok'] and counted['counts']['certified'] == (0.0, 1.0)
  # PGD's count may differ (a search); a certified sample that PGD broke may not.
  assert dc.compare_evaluations(run(margins, dict(sums, pgd_robust=1.0)), run(margins, sums))['ok']
  broken = dc.compare_evaluations(run(margins, dict(sums, certified_but_broken=1.0)),
                                  run(margins, sums))
  assert not broken['ok']
  nan = dc.compare_evaluations(run(np.where(margins > 0.4, np.nan, margins), sums),
                               run(margins, sums))
  assert not nan['ok'] and not nan['same_non_finite_margins']


def test_compare_states_finds_a_one_ulp_difference():
  state = {'params': {'w': np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)},
           'step': np.int32(7), 'mu': (np.zeros(5, np.float32),)}
  same = dc.compare_states(state, {**state})
  assert same == {'bitwise_equal': True, 'leaves': 3, 'leaves_differing': 0,
                  'max_abs_difference': 0.0}
  w = state['params']['w'].copy()
  w[2, 3] = np.nextafter(w[2, 3], np.float32(2))   # 1.0 -> 1 + 2^-23
  moved = dc.compare_states(state, {**state, 'params': {'w': w}})
  assert not moved['bitwise_equal'] and moved['leaves_differing'] == 1
  assert moved['max_abs_difference'] == 2.0 ** -23


def test_device_tests_compute_their_references_at_full_precision(tmp_path):
  # A test file run the way the device tests are: its unannotated jnp product
  # must lower at HIGHEST there (TF32 on a GPU otherwise), an explicit DEFAULT
  # (the layers of a train step) must stay DEFAULT.
  probe = tmp_path / 'test_probe.py'
  probe.write_text(
      'import jax, jax.numpy as jnp\n'
      'from jax import lax\n'
      'def test_precision():\n'
      '  a = jnp.ones((4, 4))\n'
      '  text = jax.jit(lambda a: (a @ a, lax.dot(a, a, precision=lax.Precision.DEFAULT)))'
      '.lower(a).as_text()\n'
      '  ops = [l for l in text.splitlines() if "dot_general" in l]\n'
      '  assert len(ops) == 2 and "HIGHEST" in ops[0] and "DEFAULT" in ops[1], ops\n')
  result = dc.run_tests([str(probe)], workers=1, timeout_s=120, collect_only=False)
  assert result['ok'] and '1 passed' in result['summary'], result
