"""Regenerates ``docs/results.md`` and its figures from ``docs/results/<plan>/*.json``.

    python -m experiments.report [--results_dir=docs/results] [--out=docs/results.md]

Every number on the page comes from those files (written by `experiments.study`):
per plan, a row per model with mean ± sample std over seeds, and the per-seed
rows; ``docs/results/summary.json`` holds the same tables as data. The paper's
CIFAR-10 rows are quoted for the direction of the comparisons only. The
discussion is kept in ``docs/results_discussion.md`` and included verbatim;
the claim checks above it are computed here.
"""
from __future__ import annotations

import glob
import json
import os
import re
import statistics

from absl import app, flags

from experiments import study  # noqa: F401  (defines --results_dir, where the study wrote)

flags.DEFINE_string('out', 'docs/results.md', 'Markdown page to write.')
FLAGS = flags.FLAGS

NAMES = {'cerdeq': 'CerDEQ (Björck)', 'cerdeq_reparam_rho': 'CerDEQ (Björck reparametrised, ρ bound)',
         'deq_sn': 'DEQ+SN', 'deq_wn': 'DEQ+WN', 'cnn7': 'CNN-7',
         'cnn7_crown_ibp': 'CNN-7 (CROWN-IBP)', 'linf_dist': 'ℓ∞-dist Net'}
#: CIFAR-10, ε = 8/255, 70 epochs (brief §3, §5): standard, certified error in %.
PAPER = {'cerdeq': (53.43, 67.21), 'deq_sn': (57.43, 68.66), 'deq_wn': (56.34, 69.84),
         'cnn7': (56.64, 68.81)}
METRICS = ('standard_error', 'pgd_error', 'certified_error')
PLAN_ORDER = ('main', 'baselines', 'ablation', 'depth', 'recipe', 'select')


def load(results_dir: str) -> dict[str, dict[str, dict]]:
  """``{plan: {run name: result}}`` from ``results_dir/<plan>/<run>.json``."""
  out: dict[str, dict[str, dict]] = {}
  for path in sorted(glob.glob(os.path.join(results_dir, '*', '*.json'))):
    plan = os.path.basename(os.path.dirname(path))
    with open(path) as f:
      out.setdefault(plan, {})[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
  return out


def group_of(run: str) -> str:
  """``cerdeq_s1`` -> ``cerdeq``: runs that differ only in the seed."""
  return re.sub(r'_s\d+$', '', run)


def mean_std(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (None for one value)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(ms) -> str:
  mean, std = ms
  return f'{mean:.2f}' + (f' ± {std:.2f}' if std is not None else '')


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
  """Per group: seeds, mean/std of every metric and of the training time, and
  the per-seed rows."""
  groups: dict[str, list] = {}
  for name, r in sorted(runs.items()):
    groups.setdefault(group_of(name), []).append((name, r))
  out = {}
  for group, members in groups.items():
    rs = [r for _, r in members]
    out[group] = {
        'seeds': [r['config']['seed'] for r in rs],
        **{m: mean_std([r[m] for r in rs]) for m in METRICS},
        'train_time_s': mean_std([r.get('train_time_s', 0.0) for r in rs]),
        'certified_but_broken': sum(r['certified_but_broken'] for r in rs),
        **({'certified_crown_error': mean_std([r['certified_crown_error'] for r in rs]),
            'verifier': rs[0]['config'].get('verifier')}
           if all('certified_crown_error' in r for r in rs) else {}),
        'per_seed': [{'run': n, 'seed': r['config']['seed'], 'steps': r['steps'],
                      'epochs': r['config']['epochs'], 'train_time_s': r.get('train_time_s'),
                      **{m: r[m] for m in METRICS},
                      **{k: r[k] for k in ('deq_iterations_mean', 'deq_iterations_max',
                                           'deq_lipschitz') if k in r}}
                     for n, r in members]}
  return out


def table(summary: dict[str, dict], runs: dict[str, dict]) -> list[str]:
  rows = ['| run | seeds | standard error % | PGD error % | certified error % | '
          'budget (idle min) | measured train time (min) | epochs | bound iterations (mean/max) |',
          '|---|---|---|---|---|---|---|---|---|']
  for group, s in summary.items():
    seeds = s['per_seed']
    its = '–'
    if 'deq_iterations_mean' in seeds[0]:
      its = (f'{statistics.fmean(p["deq_iterations_mean"] for p in seeds):.1f} / '
             f'{max(p["deq_iterations_max"] for p in seeds):.0f}')
    t = s['train_time_s']
    budget = next(iter(runs.values())).get('budget_minutes')
    rows.append(f'| {group} | {len(seeds)} | {fmt(s["standard_error"])} | '
                f'{fmt(s["pgd_error"])} | {fmt(s["certified_error"])} | '
                f'{budget if budget is not None else "–"} | '
                f'{t[0] / 60:.1f} | {seeds[0]["epochs"]:g} | {its} |')
  rows += [f'\n{group}: certified by IBP or by {s["verifier"].upper().replace("_", "-")} '
           f'(`--verifier={s["verifier"]}`): {fmt(s["certified_crown_error"])} % '
           '(the table\'s column: IBP alone).'
           for group, s in summary.items() if 'certified_crown_error' in s]
  rows += ['', '<details><summary>per seed</summary>', '',
           '| run | standard % | PGD % | certified % | train time (min) | steps |',
           '|---|---|---|---|---|---|']
  for s in summary.values():
    for p in s['per_seed']:
      rows.append(f'| {p["run"]} | {p["standard_error"]:.2f} | {p["pgd_error"]:.2f} | '
                  f'{p["certified_error"]:.2f} | {(p["train_time_s"] or 0) / 60:.1f} | '
                  f'{p["steps"]} |')
  rows += ['', '</details>', '']
  commands = sorted({r.get('command', '') for r in runs.values()})
  rows += ['Commands (`python -m experiments.study --plan=...` runs them):', '']
  rows += [f'    {c}' for c in commands] + ['']
  return rows


def larger_std(a, b) -> float:
  return max(a[1] or 0.0, b[1] or 0.0)


def verdict(a, b) -> str:
  """Whether mean ``a`` is lower than mean ``b`` beyond the larger std."""
  spread = larger_std(a, b)
  return ('is not decided (one seed: no spread to compare with)' if None in (a[1], b[1])
          else 'holds' if b[0] - a[0] > spread else
          'is reversed' if a[0] - b[0] > spread else 'is not decided (within the spread)')


def chosen_cerdeq(plans: dict[str, dict[str, dict]]) -> str:
  """The CerDEQ variant the main comparison stands on: of those in the main
  plan, the one with the lowest mean validation certified error in the select
  plan (the test set never chooses)."""
  main, select = plans.get('main', {}), plans.get('select', {})
  candidates = [g for g in main if g.startswith('cerdeq') and g in select]
  if not candidates:
    return 'cerdeq'
  return min(candidates, key=lambda g: select[g]['certified_error'][0])


def claims(plans: dict[str, dict[str, dict]]) -> list[str]:
  """Computed checks; a difference counts only if it exceeds the larger std."""
  lines = []
  main = plans.get('main', {})
  chosen = chosen_cerdeq(plans)
  variants = sorted(g for g in main if g.startswith('cerdeq')) if 'cnn7' in main else []
  for group in variants:
    a, b = main[group]['certified_error'], main['cnn7']['certified_error']
    role = ('the variant chosen on validation' if group == chosen
            else 'not chosen on validation: reported, not a claim')
    lines.append(f'* Claim 1, {NAMES.get(group, group)} ({role}) certifies better than CNN-7: '
                 f'{fmt(a)} vs {fmt(b)} % (difference {b[0] - a[0]:+.2f}, larger std '
                 f'{larger_std(a, b):.2f}) → {verdict(a, b)}.')
  baselines = plans.get('baselines', {})
  for other in ('cnn7_crown_ibp', 'linf_dist', 'linf_dist_mlp'):
    if chosen in main and other in baselines:
      a, b = main[chosen]['certified_error'], baselines[other]['certified_error']
      lines.append(f'* {NAMES.get(chosen, chosen)} (main plan) vs {NAMES.get(other, other)} '
                   f'(baselines plan, same budget): {fmt(a)} vs {fmt(b)} % → {verdict(a, b)}.')
  ablation = plans.get('ablation', {})
  for other in ('deq_sn', 'deq_wn'):
    if other not in ablation:
      continue
    b = ablation[other]['certified_error']
    if chosen in ablation:  # same plan, same budget
      a = ablation[chosen]['certified_error']
      lines.append(f'* Claim 2, {NAMES.get(chosen, chosen)} certifies better than '
                   f'{NAMES[other]} (ablation plan, same budget): {fmt(a)} vs {fmt(b)} % → '
                   f'{verdict(a, b)}.')
    elif chosen in main:
      a = main[chosen]['certified_error']
      lines.append(f'* Claim 2, {NAMES.get(chosen, chosen)} (main plan, longer budget) vs '
                   f'{NAMES[other]} (ablation plan): {fmt(a)} vs {fmt(b)} %.')
  depth = sorted((int(re.sub(r'\D', '', g)), s) for g, s in plans.get('depth', {}).items())
  if len(depth) >= 2:
    errs = [s['certified_error'][0] for _, s in depth]
    monotone = all(x <= y for x, y in zip(errs, errs[1:]))
    lines.append('* Claim 3, deeper CNNs certify worse: ' + ', '.join(
        f'{d} layers {e:.2f}' for (d, _), e in zip(depth, errs)) +
        f' → {"monotone increase" if monotone else "not monotone"} here (one seed).')
  return lines


def plot_curves(runs: dict[str, dict], path: str) -> None:
  """Per-epoch certified error (on the per-epoch subset) of every run."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  colours = {}
  for name, r in sorted(runs.items()):
    log = r.get('epochs_log', [])
    if not log:
      continue
    group = group_of(name)
    colour = colours.setdefault(group, f'C{len(colours)}')
    ax.plot([e['step'] for e in log], [e['test_certified_error'] for e in log], '-',
            color=colour, alpha=0.8, label=group if name.endswith('_s0') or '_s' not in name
            else None)
  ax.set_xlabel('training step'); ax.set_ylabel('certified error (%)')
  ax.set_title('Fashion-MNIST, ε = 0.1 (per-epoch evaluation subset)'); ax.legend()
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def plot_depth(depth_runs: dict[str, dict], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = sorted((r['config']['depth'], r) for r in depth_runs.values())
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for metric, style in (('certified_error', 'o-'), ('standard_error', 's--')):
    ax.plot([d for d, _ in rows], [r[metric] for _, r in rows], style,
            label=f'CNN-BN ({metric.split("_")[0]})')
  ax.set_xlabel('number of conv layers'); ax.set_ylabel('test error (%)')
  ax.set_title('Fashion-MNIST, ε = 0.1'); ax.legend(); fig.tight_layout()
  fig.savefig(path, dpi=110); plt.close(fig)


def plot_spectra(runs: dict[str, dict], path: str) -> list[str]:
  """Normalised singular values of each DEQ's trained W; returns a line per run."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  lines = []
  for name, r in sorted(runs.items()):
    sv = sorted(r.get('hidden_singular_values', []), reverse=True)
    if not sv:
      continue
    ax.semilogy(range(1, len(sv) + 1), [s / sv[0] for s in sv], 'o-', ms=3, label=name)
    above = sum(s > 0.1 * sv[0] for s in sv)
    lines.append(f'{name}: {above} of {len(sv)} singular values above 0.1 × the largest '
                 f'(smallest/largest = {sv[-1] / sv[0]:.3g})')
  ax.set_xlabel('index'); ax.set_ylabel('singular value / largest')
  ax.set_title('Spectrum of the trained DEQ weight W (flattened)'); ax.legend(fontsize=7)
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
  return lines


def main(argv):
  del argv
  plans = load(FLAGS.results_dir)
  if not plans:
    raise SystemExit(f'error: no results in {FLAGS.results_dir}/<plan>/; '
                     'run python -m experiments.study --plan=main')
  out_dir = os.path.dirname(FLAGS.out) or '.'
  order = [p for p in PLAN_ORDER if p in plans] + sorted(set(plans) - set(PLAN_ORDER))
  summaries = {p: summarize(plans[p]) for p in order}
  lines = ['# Results: the paper\'s comparisons on Fashion-MNIST (CPU)', '',
           'Generated by `python -m experiments.report` from `docs/results/<plan>/*.json` '
           '(written by `python -m experiments.study --plan=<plan>`). ε = 0.1 in pixel units; '
           'errors in %, mean ± sample std over seeds; PGD: 10 steps, 1 start. Time-budgeted '
           'plans give each run the same training wall-clock on the idle machine (steps = '
           'budget / idle step time, `docs/results/calibration.json`); the measured training '
           'time of each run is in the tables, and exceeds the budget exactly when other jobs '
           'shared the machine. The paper\'s numbers are CIFAR-10 at ε = 8/255 '
           '(70 epochs), quoted for direction only: ' + ', '.join(
               f'{NAMES[k]} {v[0]:.2f} / {v[1]:.2f}' for k, v in PAPER.items()) + '.', '']
  all_runs = {}
  for plan in order:
    split = {r.get('split', 'test') for r in plans[plan].values()}
    title = next(iter(plans[plan].values())).get('plan_description', '')
    lines += [f'## Plan `{plan}`: {title}', '',
              f'Evaluated on the {"/".join(sorted(split))} split '
              f'({next(iter(plans[plan].values()))["examples"]} images).', '']
    lines += table(summaries[plan], plans[plan])
    if plan in ('main', 'ablation'):
      all_runs.update({f'{n}': r for n, r in plans[plan].items()})
  if all_runs:
    plot_curves(all_runs, os.path.join(out_dir, 'results_curves.png'))
    lines += ['## Figures', '', '![certified error during training](results_curves.png)', '']
    spectra = plot_spectra(all_runs, os.path.join(out_dir, 'results_spectra.png'))
    if spectra:
      lines += ['![spectra](results_spectra.png)', ''] + ['* ' + s for s in spectra] + ['']
  if 'depth' in plans:
    plot_depth(plans['depth'], os.path.join(out_dir, 'results_depth.png'))
    lines += ['![certified error against depth](results_depth.png)', '']
  lines += ['## Claim checks (computed)', ''] + claims(summaries) + ['']
  broken = sum(s['certified_but_broken'] for p in summaries.values() for s in p.values())
  lines += [f'* Soundness: certified samples broken by PGD, all runs together: {broken}.', '']
  discussion = os.path.join(out_dir, 'results_discussion.md')
  if os.path.exists(discussion):
    lines += [open(discussion).read()]
  with open(FLAGS.out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(FLAGS.results_dir, 'summary.json'), 'w') as f:
    json.dump(summaries, f, indent=1)
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
