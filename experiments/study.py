"""The Fashion-MNIST comparison study (the paper's three claims, on the CPU).

    python -m experiments.study --workdir=runs/study [--seeds=0,1] [--only=cerdeq,cnn7]

Runs every model with one fixed budget (`BUDGET`) through
``python -m experiments.fashion_mnist`` (a subprocess per run, so a failing run
does not stop the others and each can be resumed), then copies each
``results.json`` (with the per-epoch metrics) to ``docs/results/<run>.json``.
`experiments.report` turns those files into ``docs/results.md``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string('workdir', 'runs/study', 'Parent folder of the runs.')
flags.DEFINE_list('seeds', ['0'], 'Seeds of the four main models.')
flags.DEFINE_list('depths', ['2', '3', '4', '6'], 'Depths of the CNN-BN sweep (seed 0).')
flags.DEFINE_list('only', [], 'Run only these run names (e.g. cerdeq_s0,depth4).')
flags.DEFINE_string('results_dir', 'docs/results', 'Where results.json copies go.')
flags.DEFINE_list('extra', [], 'Extra flags passed to every run, e.g. --epochs=6.')
FLAGS = flags.FLAGS

#: One budget for every model: same data, schedule shape, optimiser, evaluation.
BUDGET = ['--eps=0.1', '--epochs=5', '--train_examples=10000', '--batch_size=128',
          '--eps_start_epochs=1', '--eps_length_epochs=3', '--milestones=4', '--width=16',
          '--dense=128', '--eval_examples_per_epoch=200', '--pgd_steps=5', '--progress=false']
MAIN_MODELS = ('cerdeq', 'deq_sn', 'deq_wn', 'cnn7')


def runs() -> dict[str, list[str]]:
  plan = {}
  for seed in FLAGS.seeds:
    for model in MAIN_MODELS:
      plan[f'{model}_s{seed}'] = [f'--model={model}', f'--seed={seed}']
  for depth in FLAGS.depths:
    plan[f'depth{depth}'] = ['--model=cnn_depth', f'--depth={depth}', '--seed=0']
  return plan


def _running_elsewhere(workdir: str) -> bool:
  """Whether another live study process holds ``workdir`` (so several study
  processes can share the plan, e.g. one per core)."""
  try:
    with open(os.path.join(workdir, '.running')) as f:
      pid = int(f.read())
    os.kill(pid, 0)
  except (OSError, ValueError):
    return False
  return pid != os.getpid()


def main(argv):
  del argv
  os.makedirs(FLAGS.results_dir, exist_ok=True)
  for name, args in runs().items():
    if FLAGS.only and name not in FLAGS.only:
      continue
    workdir = os.path.join(FLAGS.workdir, name)
    done = os.path.join(workdir, 'results.json')
    if not os.path.exists(done):
      if _running_elsewhere(workdir):
        print(f'run {name} is running in another process; skipping', flush=True)
        continue
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, '.running'), 'w') as f:
        f.write(str(os.getpid()))
      resume = ['--resume'] if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []
      cmd = [sys.executable, '-m', 'experiments.fashion_mnist', f'--workdir={workdir}',
             *BUDGET, *args, *FLAGS.extra, *resume]
      print('$', ' '.join(cmd[1:]), flush=True)
      if subprocess.run(cmd, check=False).returncode != 0:
        print(f'run {name} failed; continuing', flush=True)
        continue
    with open(done) as f:
      result = json.load(f)
    metrics = os.path.join(workdir, 'metrics.jsonl')
    result['epochs_log'] = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
    result['command'] = ('python -m experiments.fashion_mnist ' +
                         ' '.join(BUDGET + args + list(FLAGS.extra)))
    with open(os.path.join(FLAGS.results_dir, f'{name}.json'), 'w') as f:
      json.dump(result, f, indent=1)
    shutil.copy(os.path.join(workdir, 'errors_per_epoch.png'),
                os.path.join(FLAGS.results_dir, f'{name}_errors.png')) \
        if os.path.exists(os.path.join(workdir, 'errors_per_epoch.png')) else None


if __name__ == '__main__':
  app.run(main)
