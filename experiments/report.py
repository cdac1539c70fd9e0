"""Regenerates ``docs/results.md`` and its figures from ``docs/results/*.json``.

    python -m experiments.report [--results_dir=docs/results] [--out=docs/results.md]

Every number on the page comes from those files (written by `experiments.study`);
the paper's CIFAR-10 rows are quoted for comparison only. The discussion is
kept in ``docs/results_discussion.md`` and included verbatim; the claim checks
above it are computed here.
"""
from __future__ import annotations

import glob
import json
import os
import statistics

from absl import app, flags

flags.DEFINE_string('results_dir', 'docs/results', 'Folder of results JSON files.')
flags.DEFINE_string('out', 'docs/results.md', 'Markdown page to write.')
FLAGS = flags.FLAGS

NAMES = {'cerdeq': 'CerDEQ (Björck)', 'deq_sn': 'DEQ+SN', 'deq_wn': 'DEQ+WN', 'cnn7': 'CNN-7'}
#: CIFAR-10, ε = 8/255, 70 epochs (brief §3, §5): standard, certified error in %.
PAPER = {'cerdeq': (53.43, 67.21), 'deq_sn': (57.43, 68.66), 'deq_wn': (56.34, 69.84),
         'cnn7': (56.64, 68.81)}
METRICS = ('standard_error', 'pgd_error', 'certified_error')


def load(results_dir: str) -> dict[str, dict]:
  out = {}
  for path in sorted(glob.glob(os.path.join(results_dir, '*.json'))):
    with open(path) as f:
      out[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
  return out


def _mean_std(values):
  if not values:
    return None
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else None
  return mean, std


def _fmt(ms):
  if ms is None:
    return '–'
  mean, std = ms
  return f'{mean:.2f}' + (f' ± {std:.2f}' if std is not None else '')


def main_table(results: dict) -> tuple[str, dict]:
  rows = ['| model | seeds | standard error % | PGD error % | certified error % | train time (s) '
          '| bound iterations (mean/max) | L | paper CIFAR-10 standard / certified % |',
          '|---|---|---|---|---|---|---|---|---|']
  summary = {}
  for key, label in NAMES.items():
    runs = [r for name, r in results.items() if name.startswith(f'{key}_s')]
    if not runs:
      continue
    stats = {m: _mean_std([r[m] for r in runs]) for m in METRICS}
    summary[key] = stats
    t = statistics.fmean(r.get('train_time_s', 0) for r in runs)
    its = (f'{statistics.fmean(r["deq_iterations_mean"] for r in runs):.1f} / '
           f'{max(r["deq_iterations_max"] for r in runs):.0f}') if 'deq_iterations_mean' in runs[0] else '–'
    lip = f'{max(r["deq_lipschitz"] for r in runs):.3f}' if 'deq_lipschitz' in runs[0] else '–'
    paper = PAPER[key]
    rows.append(f'| {label} | {len(runs)} | {_fmt(stats["standard_error"])} | '
                f'{_fmt(stats["pgd_error"])} | {_fmt(stats["certified_error"])} | {t:.0f} | '
                f'{its} | {lip} | {paper[0]:.2f} / {paper[1]:.2f} |')
  return '\n'.join(rows), summary


def depth_rows(results: dict) -> list[tuple[int, dict]]:
  rows = []
  for name, r in results.items():
    if name.startswith('depth'):
      rows.append((int(r['config']['depth']), r))
  return sorted(rows, key=lambda x: x[0])


def plot_depth(rows, summary, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.plot([d for d, _ in rows], [r['certified_error'] for _, r in rows], 'o-',
          label='CNN-BN (certified)')
  ax.plot([d for d, _ in rows], [r['standard_error'] for _, r in rows], 's--', alpha=0.6,
          label='CNN-BN (standard)')
  if 'cerdeq' in summary:
    ax.axhline(summary['cerdeq']['certified_error'][0], color='C3', label='CerDEQ (certified)')
  ax.set_xlabel('number of conv layers'); ax.set_ylabel('test error (%)')
  ax.set_title('Fashion-MNIST, ε = 0.1'); ax.legend(); fig.tight_layout()
  fig.savefig(path, dpi=110); plt.close(fig)


def plot_spectra(results, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for key in ('deq_wn', 'deq_sn', 'cerdeq'):
    run = results.get(f'{key}_s0')
    if run and 'hidden_singular_values' in run:
      sv = sorted(run['hidden_singular_values'], reverse=True)
      ax.semilogy(range(1, len(sv) + 1), [s / sv[0] for s in sv], 'o-', ms=3, label=NAMES[key])
  ax.set_xlabel('index'); ax.set_ylabel('singular value / largest')
  ax.set_title('Spectrum of the trained DEQ weight W (flattened)'); ax.legend()
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def effective_rank(sv, threshold=0.1) -> int:
  """Number of singular values above ``threshold`` times the largest."""
  return sum(s > threshold * max(sv) for s in sv)


def main(argv):
  del argv
  results = load(FLAGS.results_dir)
  if not results:
    raise SystemExit(f'error: no results in {FLAGS.results_dir}; run python -m experiments.study')
  out_dir = os.path.dirname(FLAGS.out) or '.'
  table, summary = main_table(results)
  rows = depth_rows(results)
  plot_depth(rows, summary, os.path.join(out_dir, 'results_depth.png'))
  plot_spectra(results, os.path.join(out_dir, 'results_spectra.png'))
  any_run = next(iter(results.values()))
  lines = ['# Results: the paper\'s comparisons on Fashion-MNIST (CPU)', '',
           'Generated by `python -m experiments.report` from the files in '
           f'`{FLAGS.results_dir}/` (written by `python -m experiments.study`). Errors are on the '
           f'full Fashion-MNIST test set ({any_run["examples"]} images) at ε = {any_run["eps"]} '
           f'(pixel units); PGD: {any_run["config"]["pgd_steps"]} steps, '
           f'{any_run["config"]["pgd_restarts"]} start(s). The paper\'s column is CIFAR-10 at ε = 8/255 '
           '(70 epochs), quoted for the direction of the comparisons, not for the numbers.', '',
           '## Budget, commands, machine', '',
           f'* Machine: {any_run.get("platform", "cpu")}, {any_run.get("devices", 1)} device(s) '
           '(a 2-core x86-64 VM without accelerator).',
           '* Each run: `' + any_run.get('command', '') + '` (model and seed flags differ).', '',
           '## DEQs against CNN-7 (claims 1 and 2)', '', table, '']
  lines += ['## Certified error against depth (claim 3)', '',
            '| conv layers | standard error % | PGD error % | certified error % | train time (s) |',
            '|---|---|---|---|---|']
  for d, r in rows:
    lines.append(f'| {d} | {r["standard_error"]:.2f} | {r["pgd_error"]:.2f} | '
                 f'{r["certified_error"]:.2f} | {r.get("train_time_s", 0):.0f} |')
  lines += ['', '![certified error against depth](results_depth.png)', '',
            '## Singular values of the trained W', '',
            '![spectra](results_spectra.png)', '']
  ranks = []
  for key in ('deq_wn', 'deq_sn', 'cerdeq'):
    run = results.get(f'{key}_s0')
    if run and 'hidden_singular_values' in run:
      sv = run['hidden_singular_values']
      ranks.append(f'{NAMES[key]}: {effective_rank(sv)} of {len(sv)} singular values above '
                   f'0.1 × the largest (smallest/largest = {min(sv) / max(sv):.3g})')
  lines += ['* ' + r for r in ranks] + ['']
  lines += ['## Claim checks (computed)', '']
  if 'cerdeq' in summary and 'cnn7' in summary:
    a, b = summary['cerdeq']['certified_error'][0], summary['cnn7']['certified_error'][0]
    lines.append(f'* Claim 1, CerDEQ < CNN-7 in certified error: {a:.2f} vs {b:.2f} → '
                 f'{"holds" if a < b else "does not hold"} here.')
  for other in ('deq_sn', 'deq_wn'):
    if 'cerdeq' in summary and other in summary:
      a, b = summary['cerdeq']['certified_error'][0], summary[other]['certified_error'][0]
      lines.append(f'* Claim 2, CerDEQ < {NAMES[other]}: {a:.2f} vs {b:.2f} → '
                   f'{"holds" if a < b else "does not hold"} here.')
  if len(rows) >= 2:
    errs = [r['certified_error'] for _, r in rows]
    increasing = all(x <= y for x, y in zip(errs, errs[1:]))
    by_depth = ', '.join(f'{d}: {r["certified_error"]:.2f}' for d, r in rows)
    lines.append(f'* Claim 3, deeper CNNs certify worse: certified error by depth {by_depth} → '
                 f'{"monotone increase" if increasing else "not monotone"} here.')
  discussion = os.path.join(out_dir, 'results_discussion.md')
  if os.path.exists(discussion):
    lines += ['', open(discussion).read()]
  with open(FLAGS.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
