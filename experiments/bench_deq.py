"""The certified CerDEQ step's weight (not a test): peak resident memory and
time against the natural step, and Anderson against Picard on a trained layer.

    python -m experiments.bench_deq [--batch_size=128] [--rounds=5] [--trained=runs/.../cerdeq,...]
    python -m experiments.bench_deq --rounds=0 --trained=...   # the trained layers only

Each step kind runs in its own fresh process (``--child``), so that its peak
resident set (the kernel's ``VmHWM``: the import, the compilation and the
steps together) is that step's alone; the parent runs the children one after
the other and reports the ratios. Used by ``experiments.benchmark --suite=deq``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string('child', None, "Internal: run one step kind ('natural' | 'certified').")
flags.DEFINE_integer('batch_size', 128, 'Batch of the CIFAR-10-shaped train steps.')
flags.DEFINE_integer('steps', 5, 'Timed steps after the first (compiling) one; median (with '
                     '3, A/B differences of 0.3-1 s came and went on this noisy 2-core VM).')
flags.DEFINE_integer('rounds', 1, 'Rounds of (natural, certified) processes, alternating; the '
                     'ratio is the median over rounds, each ratio within one round (0: none).')
flags.DEFINE_list('trained', [], 'Workdirs of trained DEQ runs, for the iteration counts of '
                  'their bound solves.')
FLAGS = flags.FLAGS

KINDS = ('natural', 'certified')


def _peak_rss_mb() -> float:
  with open('/proc/self/status') as f:
    fields = dict(line.split(':', 1) for line in f)
  return int(fields['VmHWM'].split()[0]) / 1024


def run_kind(kind: str, batch_size: int, steps: int) -> dict:
  """One step kind of the CIFAR-10-shaped CerDEQ (64-channel DEQ at 32x32, the
  CIFAR-10 defaults: Anderson, tol 1e-4, 50 iterations, full ε), in this process."""
  import jax
  import numpy as np
  from cerdeq_jax import host_memory, training
  from experiments.bench_fixtures import cifar_train_setup

  steps_, state, global_batch = cifar_train_setup('cerdeq', batch_size)
  step = steps_.compiled_train(training.StepKind(kind == 'certified', False))
  step = step.lower(state, global_batch).compile()  # compiled once, used below
  host_memory.release_freed_heap()  # as `training.Steps` does after compiling
  temp = step.memory_analysis()
  times, iterations = [], []
  for _ in range(steps + 1):
    t = time.perf_counter()
    state, metrics = step(state, global_batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
    iterations.append(float(metrics['deq_iterations']))
  return {'seconds_per_step': float(np.median(times[1:])), 'peak_rss_mb': _peak_rss_mb(),
          'xla_temp_mb': temp.temp_size_in_bytes / 2**20 if temp else None,
          'deq_iterations': float(np.mean(iterations[1:]))}


def step_weight(batch_size: int = 128, steps: int = 5, rounds: int = 1) -> dict:
  """Natural and certified CerDEQ steps, each in a fresh process, ``rounds``
  times alternating (so that a slow spell of the machine hits both kinds), and
  their ratios: per round, and the median over rounds. Each kind's figures are
  those of the median round."""
  res = {'shape': f'CIFAR-10 CerDEQ, batch {batch_size}, each kind in its own process',
         'rounds': rounds}
  runs = {kind: [] for kind in KINDS}
  for _ in range(rounds):
    for kind in KINDS:
      out = subprocess.run([sys.executable, '-m', 'experiments.bench_deq', f'--child={kind}',
                            f'--batch_size={batch_size}', f'--steps={steps}'],
                           check=True, capture_output=True, text=True).stdout
      runs[kind].append(json.loads(out.strip().splitlines()[-1]))
  ratios = [c['seconds_per_step'] / n['seconds_per_step']
            for n, c in zip(runs['natural'], runs['certified'])]
  middle = sorted(range(rounds), key=ratios.__getitem__)[rounds // 2]
  res.update({kind: runs[kind][middle] for kind in KINDS})
  res['certified_over_natural_time'] = ratios[middle]
  if rounds > 1:
    res['ratio_per_round'] = ratios
    res['peak_rss_mb_per_round'] = [c['peak_rss_mb'] for c in runs['certified']]
  return res


def trained_layer_iterations(workdir: str, examples: int = 256, tol: float = 1e-4) -> dict:
  """Mean iterations of the trained DEQ's bound solve (interval, at the run's ε,
  test images) and its nominal solve, with Anderson and with Picard, both to
  ``tol`` (relative residual) with up to 500 iterations."""
  import dataclasses

  import jax
  import numpy as np
  from cerdeq_jax import checkpointing, data, training
  from cerdeq_jax.interval import linf_ball
  from experiments import loop, run_files
  from experiments.config import Config

  saved = json.loads((run_files.workdir_path(workdir) / 'results.json').read_text())['config']
  config = Config.from_json(saved)
  train_ds, test_ds = loop.load_splits(config)
  _, cfg, _, _, _, template, _ = loop.setup(config, train_ds)
  ckpt = checkpointing.Checkpointer(run_files.workdir_path(workdir) / 'checkpoints',
                                    config.identity())
  state = ckpt.restore(template)
  ckpt.close()
  x = data.normalize(test_ds.images[:examples], cfg.mean, cfg.std)
  labels = test_ds.labels[:examples]
  box = linf_ball(x, config.eps, cfg.mean, cfg.std)
  res = {'run': str(workdir), 'examples': examples, 'tol': tol}
  for solver in ('anderson', 'picard'):
    model = loop.build_model(dataclasses.replace(config, solver=solver, tol=tol, max_iter=500),
                             train_ds)
    apply = jax.jit(lambda v, inp: model.apply(v, inp, train=False, labels=labels,
                                               mutable=['deq_stats'])[1])
    for name, inp in (('interval', box), ('nominal', x)):
      stats = training.sown(apply(state.variables(state.params), inp)['deq_stats'], name)
      res[f'{solver}_{name}'] = float(np.mean(np.asarray(stats[0].iterations)))
      res[f'{solver}_{name}_converged'] = float(np.mean(np.asarray(stats[0].converged)))
  for name in ('interval', 'nominal'):
    res[f'anderson_over_picard_{name}'] = res[f'anderson_{name}'] / res[f'picard_{name}']
  return res


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(run_kind(FLAGS.child, FLAGS.batch_size, FLAGS.steps)))
    return
  res = {'step': step_weight(FLAGS.batch_size, FLAGS.steps, FLAGS.rounds)} if FLAGS.rounds else {}
  if FLAGS.trained:
    res['trained_layers'] = [trained_layer_iterations(w) for w in FLAGS.trained]
  print(json.dumps(res, indent=1))


if __name__ == '__main__':
  app.run(main)
