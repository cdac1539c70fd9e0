"""Accelerator check: ``python -m experiments.accelerator_check`` (``make accelerator-check``).

On a GPU/TPU machine, within ``--budget_s`` (8 minutes):

1. **tests**: the soundness, solver, DEQ and implicit-gradient tests
   (``--test_files``) run on the device (pytest in a subprocess);
2. **device vs CPU**: a tiny CerDEQ is trained here for a few steps, saved
   with orbax, restored on the device and on the CPU and evaluated on both;
   certified counts and margin bounds are compared; the training is repeated,
   compiled afresh, and whether the two states agree bit for bit is reported
   (exact ``--resume`` needs it; not a failure);
3. **precision**: the certified eval step, its bounds pass and a certified
   train step are lowered and their ``dot_general``/``convolution`` ops counted,
   with how many carry ``HIGHEST`` precision; by the policy of
   `cerdeq_jax.precision` every op of the first two must (else the check fails),
   the train step's layers run at its training precision (default: DEFAULT);
4. **speed**: natural and certified train steps of CNN-7 and CerDEQ at
   CIFAR-10 shape, batch 128 and 512 (`experiments.benchmark.train`), and the
   200-epoch CIFAR-10 estimate ``50,000 / batch x 200 x step time``; then at
   batch 128 with the layers at HIGHEST instead of the training default
   (DEFAULT: TF32 on a GPU), the figure that choice rests on.

The figures go to ``--json_out`` and replace the marked section of
``--docs`` (docs/performance.md). Exit status 1 if a test failed or the two
backends disagree.

``--dry_run`` is the same on the CPU with tiny shapes and a few steps; pytest
only collects, and the docs are left alone (CI runs it in
tests/test_accelerator_check.py). On a machine with JAX but no network, run it
with the interpreter that has JAX: ``make accelerator-check PY=python3``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

from absl import app, flags

# Before JAX starts: the test subprocesses share the accelerator with us.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from experiments import device_checks as dc  # pylint: disable=wrong-import-position

flags.DEFINE_bool('dry_run', False, 'CPU smoke run: tiny shapes, pytest collects only, no docs.')
flags.DEFINE_integer('budget_s', 480, 'Wall-time budget; timings that would overrun are skipped.')
flags.DEFINE_list('test_files', ['tests/test_deq.py', 'tests/test_solvers.py',
                                 'tests/test_ibp.py', 'tests/test_implicit.py'],
                  'Test files run on the device (their non-slow tests).')
flags.DEFINE_integer('test_workers', 8, 'pytest-xdist workers for the device tests (1: none); '
                     'they compile on the host CPUs and share the accelerator.')
flags.DEFINE_integer('test_timeout_s', 200, 'Time limit of the device tests.')
flags.DEFINE_list('batch_sizes', ['128', '512'], 'Batch sizes of the train-step timings.')
flags.DEFINE_list('train_precisions', ['default', 'highest'],
                  'Layer precisions of the train-step timings: the first (the training default) '
                  'at every batch size, the others at the first batch size, timed last.')
flags.DEFINE_integer('timing_repeats', 3, 'Timed steps per measurement (the median is kept).')
flags.DEFINE_string('json_out', None, 'JSON file (default: docs/accelerator_check.json, or '
                    'runs/accelerator_check_dry_run.json with --dry_run).')
flags.DEFINE_string('docs', 'docs/performance.md', 'Page whose marked section is replaced.')
FLAGS = flags.FLAGS

# Seconds a (model, batch) timing is assumed to need at most on the device
# (two compilations and the timed steps); one is not started with less left.
TIMING_RESERVE_S = 75.0


def _say(text: str) -> None:
  print(text, flush=True)


def _stage(report: dict, name: str, fn, *args):
  """Runs one stage; an exception is recorded (the other stages still run)."""
  t0 = time.time()
  _say(f'[{name}] ...')
  try:
    report[name] = fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    report[name] = {'error': f'{type(e).__name__}: {e}'.splitlines()[0][:500]}
  report[name]['stage_s'] = round(time.time() - t0, 1)
  _say(f'[{name}] done in {report[name]["stage_s"]} s')


def _machine() -> dict:
  import jax
  device = jax.devices()[0]
  return {'platform': device.platform, 'device_kind': device.device_kind,
          'device_count': jax.device_count(), 'jax': jax.__version__,
          'cpu': platform.machine(), 'date': time.strftime('%Y-%m-%d')}


def run(dry_run: bool, deadline: float) -> dict:
  """All four stages; returns the report (JSON-serialisable)."""
  run_cfg = (dc.TinyRun(image_size=8, width=4, dense=16, batch=16, steps=2, pgd_steps=2)
             if dry_run else dc.TinyRun())
  shapes = dict(image_size=8, model_kwargs={'width': 4, 'dense': 16}) if dry_run else dict(
      image_size=32, model_kwargs={})
  report = {'machine': _machine(), 'dry_run': dry_run, 'train_shapes': shapes,
            'command': 'python -m experiments.accelerator_check' + (' --dry_run' * dry_run)}
  _stage(report, 'tests', dc.run_tests, FLAGS.test_files, FLAGS.test_workers,
         FLAGS.test_timeout_s, dry_run)
  _stage(report, 'device_vs_cpu', dc.device_vs_cpu, run_cfg)
  _stage(report, 'precision', dc.lowered_precision, run_cfg)
  batch_sizes = [8] if dry_run else [int(b) for b in FLAGS.batch_sizes]
  _stage(report, 'train_steps', dc.time_train_steps, ('cnn7', 'cerdeq'), batch_sizes,
         1 if dry_run else FLAGS.timing_repeats, shapes['image_size'], shapes['model_kwargs'],
         deadline, 0.0 if dry_run else TIMING_RESERVE_S, tuple(FLAGS.train_precisions))
  return report


def _fmt(value, spec: str = '.3g') -> str:
  return '—' if value is None else format(value, spec)


def summary_lines(report: dict) -> list[str]:
  """The figures as Markdown (printed, and the docs section's body)."""
  m = report['machine']
  lines = [f'Run on {m["date"]}: {m["device_count"]} × {m["device_kind"]} ({m["platform"]}), '
           f'jax {m["jax"]}, `{report["command"]}`, {report["wall_s"]:.0f} s in all.', '']
  t = report['tests']
  lines += ['**Tests on the device**: ' + (
      f'`{t["command"]}` → {t["summary"]} ({t["seconds"]:.0f} s).' if 'command' in t
      else f'error: {t["error"]}')]
  lines += [f'* `{l}`' for l in t.get('failed', [])[:10]] + ['']
  d = report['device_vs_cpu']
  if 'counts' in d:
    lines += [f'**One checkpoint on {d["device_platform"]} and on the CPU** (tiny CerDEQ, '
              f'{d["run"]["batch"]} samples, ε = {d["run"]["eps"]:.4g}): '
              + ('agree' if d['ok'] else '**DISAGREE**') + '.', '',
              '| | device | CPU |', '|---|---|---|']
    lines += [f'| {k} | {_fmt(a, ".0f")} | {_fmt(b, ".0f")} |' for k, (a, b) in d['counts'].items()]
    lines += ['', f'Max |margin bound difference| {d["max_abs_margin_difference"]:.3g} (margins up '
              f'to {d["margin_scale"]:.3g}); samples certified differently: '
              f'{d["samples_certified_differently"]}; same non-finite margins: '
              f'{d["same_non_finite_margins"]}.', '']
    r = d['repeatable']
    lines += [f'**Repeatability**: the same {d["run"]["steps"]} train steps run twice on '
              f'{d["device_platform"]}, the second time compiled afresh (as a resumed run is), '
              + ('end equal bit for bit: `--resume` continues exactly here.' if r['bitwise_equal']
                 else f'end **different** ({r["leaves_differing"]} of {r["leaves"]} state leaves, '
                      f'max |difference| {r["max_abs_difference"]:.3g}): a resumed run ends '
                      'close to, not equal to, an uninterrupted one; '
                      '`XLA_FLAGS=--xla_gpu_deterministic_ops=true` asks XLA:GPU for '
                      'deterministic kernels.'), '']
  else:
    lines += [f'**Device vs CPU**: error: {d.get("error")}', '']
  p = report['precision']
  if 'eval_step' in p:
    lines += ['**Precision of the lowered certified evaluation** (ops in the program text):', '',
              '| program | dot_general | convolution | with HIGHEST |', '|---|---|---|---|']
    lines += [f'| {k} | {c["dot_general"]} | {c["convolution"]} | {c["highest"]} of {c["total"]} |'
              for k, c in p.items() if isinstance(c, dict)]
    lines.append('')
  else:
    lines += [f'**Precision**: error: {p.get("error")}', '']
  size, kwargs = report['train_shapes']['image_size'], report['train_shapes']['model_kwargs']
  widths = ', '.join(f'{k} {v}' for k, v in kwargs.items()) or 'default widths'
  lines += [f'**Train steps at {size}×{size}×3** ({widths}, ε = 8/255, Anderson tol 1e-3; '
            'median step time after compilation):', '',
            '| model | batch | layer precision | natural step | certified step | '
            'certified / natural | certified / at the default precision | '
            '200 epochs, all certified |', '|---|---|---|---|---|---|---|---|']
  steps = report['train_steps']
  if 'error' in steps:
    lines.append(f'| error: {steps["error"]} | | | | | | | |')
  for key, r in steps.items():
    if not isinstance(r, dict):
      continue
    row = f'| {r["model"]} | {r["batch_size"]} | {r["precision"]} | '
    if 'certified' not in r:
      lines.append(row + f'skipped ({r["skipped"]}) | | | | |')
      continue
    vs_default = r.get('certified_over_default_precision')
    lines.append(row + f'{r["natural"]["seconds_per_step"]:.3g} s | '
                 f'{r["certified"]["seconds_per_step"]:.3g} s | '
                 f'{r["certified_over_natural_time"]:.2f}× | '
                 f'{"—" if vs_default is None else format(vs_default, ".2f") + "×"} | '
                 f'{r["epochs_200_hours"]:.2f} h |')
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  t0 = time.time()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  import jax
  if not FLAGS.dry_run and jax.default_backend() == 'cpu':
    print('error: no accelerator (jax.default_backend() is cpu); pass --dry_run', file=sys.stderr)
    sys.exit(2)
  report = run(FLAGS.dry_run, t0 + FLAGS.budget_s)
  report['wall_s'] = time.time() - t0
  lines = summary_lines(report)
  _say('\n'.join(lines))
  out = FLAGS.json_out or ('runs/accelerator_check_dry_run.json' if FLAGS.dry_run
                           else 'docs/accelerator_check.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(report, f, indent=1, default=float)
  if not FLAGS.dry_run:
    with open(FLAGS.docs) as f:
      text = f.read()
    with open(FLAGS.docs, 'w') as f:
      f.write(dc.replace_section(text, '## Accelerator check\n\n' + '\n'.join(lines)))
  _say(f'wrote {out}' + ('' if FLAGS.dry_run else f' and the section of {FLAGS.docs}'))
  failed = [k for k in ('tests', 'device_vs_cpu') if not report[k].get('ok')]
  failed += [k for k in ('precision', 'train_steps') if 'error' in report[k]]
  failed += ['precision (ops below HIGHEST in evaluation)'] * (
      'error' not in report['precision'] and not report['precision'].get('ok'))
  if failed:
    _say(f'FAILED: {", ".join(failed)}')
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
