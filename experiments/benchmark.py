"""Benchmarks (not tests): ``python -m experiments.benchmark --suite=core|train|data|linf|crown|deq|all``.

Every figure is a ratio of two timings taken in the same run on the same
machine; absolute times hold only for that machine. Results are printed and
written as JSON to ``--out``.
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

from experiments.bench_fixtures import merged

flags.DEFINE_enum('suite', 'all', ['core', 'train', 'data', 'linf', 'crown', 'deq', 'all'],
                  'Which benchmarks.')
flags.DEFINE_string('out', 'docs/benchmarks.json', 'JSON file for the results: the suites run '
                    'replace their entries, the others are kept.')
flags.DEFINE_integer('repeats', 5, 'Timed repetitions (the median is reported).')
flags.DEFINE_integer('batch_size', 128, 'Batch size of the train-step benchmark.')
FLAGS = flags.FLAGS


def _timeit(fn, *args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` after one warm-up (compilation) call."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def core(repeats: int) -> dict:
  """DEQ solver costs on one conv DEQ (C=32, 14x14, batch 128: the
  Fashion-MNIST CerDEQ's size class)."""
  import jax
  import jax.numpy as jnp
  from cerdeq_jax import Interval, deq, ops, parametrize, solvers

  key = jax.random.PRNGKey(0)
  c, hw, n = 32, 14, 128
  kernel = parametrize.project_bjorck(jax.random.normal(key, (3, 3, c, c)), 0.9)
  injection = jax.random.normal(jax.random.PRNGKey(1), (n, hw, hw, c))
  box = Interval(injection - 0.1, injection + 0.1)
  res = {'shape': f'batch {n}, {hw}x{hw}, {c} channels, 3x3 hidden conv'}

  def fixed(iters):  # exactly `iters` iterations
    return solvers.Picard(tol=0.0, max_iter=iters)

  def per_iteration(make_fn, *args):
    """Seconds per iteration from the slope between 10 and 40 iterations.
    Arrays are arguments, not closed-over constants, so XLA cannot fold them."""
    t10 = _timeit(jax.jit(make_fn(10)), *args, repeats=repeats)
    t40 = _timeit(jax.jit(make_fn(40)), *args, repeats=repeats)
    return (t40 - t10) / 30

  nominal = per_iteration(lambda k: lambda w, inj: deq.solve_deq(w, inj, fixed(k))[0],
                          kernel, injection)
  interval = per_iteration(
      lambda k: lambda w, b: deq.solve_deq(w, b, fixed(k), sound=False)[0].upper, kernel, box)
  res['interval_over_nominal_iteration'] = interval / nominal

  # Backward (adjoint) iteration g <- J^T g + g_bar, as in implicit.fixed_point.
  z, _ = jax.jit(lambda w, inj: deq.solve_deq(w, inj, solvers.Anderson(tol=1e-5)))(
      kernel, injection)

  def adjoint_loop(cell_conv):
    def make(k):
      def run(w, inj, z):
        _, vjp = jax.vjp(lambda state: jax.nn.relu(cell_conv(state, w) + inj), z)
        g_bar = jnp.ones_like(z)
        return solvers.solve(lambda g: vjp(g)[0] + g_bar, g_bar, fixed(k))[0]
      return run
    return make

  backward = per_iteration(adjoint_loop(ops.same_conv), kernel, injection, z)
  backward_default_vjp = per_iteration(adjoint_loop(ops.conv), kernel, injection, z)
  forward_batched = per_iteration(lambda k: lambda w, inj, z: solvers.solve(
      lambda s: jax.nn.relu(ops.same_conv(s, w) + inj), jnp.zeros_like(z), fixed(k))[0],
      kernel, injection, z)
  res['backward_over_forward_iteration'] = backward / forward_batched
  res['backward_default_conv_vjp_over_forward_iteration'] = backward_default_vjp / forward_batched

  # Peak memory of a gradient through the DEQ: implicit vs max_iter.
  def grad_memory(iters):
    loss = lambda k, x: jnp.sum(deq.solve_deq(k, x, fixed(iters))[0] ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(kernel, injection).compile()
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes

  res['gradient_memory_60_over_15_iterations'] = grad_memory(60) / grad_memory(15)
  res['gradient_memory_bytes_15_iterations'] = grad_memory(15)

  # Iterations to tol 1e-4: on the Björck layer above ('bjorck', where the
  # nominal map contracts far faster than L says: ||W||_2 << || |W| ||_2) and on
  # a non-negative kernel with || W ||_2 = || |W| ||_2 = 0.95 ('slow').
  slow = parametrize.rescale_to_bound(jnp.abs(jax.random.normal(key, (3, 3, c, c))), 0.95)
  its = {}
  for layer, w in (('bjorck', kernel), ('slow', slow)):
    for name, solver in (('picard', solvers.Picard(tol=1e-4, max_iter=500)),
                         ('anderson', solvers.Anderson(tol=1e-4, max_iter=500))):
      for kind, inj in (('nominal', injection), ('interval', box)):
        st = jax.jit(lambda w, i: deq.solve_deq(w, i, solver)[1])(w, inj)
        its[f'{layer}_{name}_{kind}'] = float(jnp.mean(st.iterations))
        its[f'{layer}_{name}_{kind}_converged'] = float(jnp.mean(st.converged))
  res['iterations_to_1e-4'] = its
  for layer in ('bjorck', 'slow'):
    for kind in ('nominal', 'interval'):
      res[f'anderson_over_picard_iterations_{layer}_{kind}'] = (
          its[f'{layer}_anderson_{kind}'] / its[f'{layer}_picard_{kind}'])
  return res


def train(repeats: int, batch_size: int, names: tuple[str, ...] = ('cnn7', 'cerdeq'),
          image_size: int = 32, model_kwargs: dict | None = None,
          crown: bool = False, linf_width: int | None = None, precision: str = 'default') -> dict:
  """Images/s of the certified and the natural train step (CNN-7 and CerDEQ,
  CIFAR-10 sized input); with ``crown``, for CNN-7 also of the CROWN-IBP step
  (β > 0, i.e. during the ε ramp) and, with ``linf_width``, of the ℓ∞-dist Net
  step (5 layers of ``linf_width`` neurons; published: 5120). ``image_size`` and
  ``model_kwargs`` (e.g. ``width``, ``dense`` of `models.create`) shrink them,
  as the accelerator check's dry run does; ``precision``: of the layers'
  products (`CertifiedTraining.precision`; XLA:CPU ignores it)."""
  from cerdeq_jax import solvers, training
  from experiments.bench_fixtures import cifar_train_setup

  res = {}
  for name in names:
    steps, state, global_batch = cifar_train_setup(
        name, batch_size, image_size, precision, solver=solvers.Anderson(tol=1e-3, max_iter=30),
        **(model_kwargs or {}))
    out = {}
    kinds = {'natural': training.StepKind(False, False), 'certified': training.StepKind(True, False)}
    if crown and name == 'cnn7':
      kinds['crown_ibp'] = training.StepKind(True, False, crown=True)
    for label, kind in kinds.items():
      out[label], state = _time_step(steps.compiled_train(kind), state, global_batch,
                                     batch_size, repeats)
    out['certified_over_natural_time'] = (out['certified']['seconds_per_step']
                                          / out['natural']['seconds_per_step'])
    if 'crown_ibp' in out:
      out['crown_ibp_over_certified_time'] = (out['crown_ibp']['seconds_per_step']
                                              / out['certified']['seconds_per_step'])
    res[name] = out
  if linf_width:
    res['linf_dist'] = _linf_step(repeats, batch_size, image_size, linf_width)
  return res


def _time_step(step_fn, state, global_batch, batch_size, repeats):
  """Median seconds of a compiled train step; returns ``(timing, state)``."""
  holder = [state]

  def run():
    holder[0], m = step_fn(holder[0], global_batch)
    return m
  t = _timeit(run, repeats=repeats)
  return {'seconds_per_step': t, 'images_per_s': batch_size / t}, holder[0]


def _linf_step(repeats, batch_size, image_size, width):
  """The ℓ∞-dist Net train step (traced p < ∞, the general ℓp path) on
  CIFAR-sized input."""
  import jax
  import numpy as np
  from cerdeq_jax import linf_training, models, training
  x = np.random.RandomState(0).rand(batch_size, image_size, image_size, 3).astype(np.float32)
  batch = {'image': x, 'label': np.arange(batch_size) % 10, 'mask': np.ones(batch_size, bool)}
  model = models.create('linf_dist', 10, width=width, depth=5)
  linf = linf_training.LinfTraining(8 / 255, 1, p_start_epochs=0, p_end_epochs=10)
  cfg = training.CertifiedTraining(eps=8 / 255, mean=(0.,) * 3, std=(1.,) * 3, steps_per_epoch=1,
                                   method='linf_dist', linf=linf)
  tx, _ = linf_training.optimizer(0.02, 1, 10, 5e-3, linf)
  mesh = training.make_mesh()
  steps = training.Steps(model, tx, cfg, mesh)
  state = training.replicate(mesh, training.init_state(model, tx, jax.random.PRNGKey(0), x[:1]))
  out, _ = _time_step(steps.compiled_train(cfg.step_kind(0)), state,
                      training.global_batch(mesh, batch), batch_size, repeats)
  out['layers'] = f'5 x {width} neurons, input {image_size}x{image_size}x3'
  return out


def linf(repeats: int, batch: int = 128, inputs: int = 784, width: int = 2048) -> dict:
  """One ℓ∞-dist layer, forward + gradient (x and w): the chunked custom-VJP
  ops against plain autodiff of the whole ``B x O x D`` tensor; XLA's compiled
  memory (temporaries) and the median time."""
  import jax
  import jax.numpy as jnp
  from cerdeq_jax import linf_dist as L

  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch, inputs))
  w = jax.random.normal(jax.random.PRNGKey(1), (width, inputs))
  p8 = jnp.float32(8.0)

  def naive(x, w, p):
    d = jnp.abs(x[:, None, :] - w[None])
    if p is None:
      return jnp.max(d, -1)
    m = jax.lax.stop_gradient(jnp.max(d, -1, keepdims=True))
    return m[..., 0] * jnp.sum((d / m) ** p, -1) ** (1 / p)

  fns = {'linf_chunked': lambda x, w: L.linf_dist(x, w), 'linf_naive': lambda x, w: naive(x, w, None),
         'lp8_chunked': lambda x, w: L.lp_dist(x, w, p8), 'lp8_naive': lambda x, w: naive(x, w, p8)}
  res = {'shape': f'batch {batch}, {inputs} inputs, {width} neurons '
                  f'(B x O x D = {batch * width * inputs / 2**20:.0f} Mi floats)'}
  for name, fn in fns.items():
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))
    mem = grad.lower(x, w).compile().memory_analysis()
    res[name] = {'temp_bytes': mem.temp_size_in_bytes,
                 'seconds': _timeit(grad, x, w, repeats=repeats)}
  for kind in ('linf', 'lp8'):
    res[f'{kind}_naive_over_chunked_memory'] = (res[f'{kind}_naive']['temp_bytes']
                                                / max(res[f'{kind}_chunked']['temp_bytes'], 1))
    res[f'{kind}_naive_over_chunked_time'] = (res[f'{kind}_naive']['seconds']
                                              / res[f'{kind}_chunked']['seconds'])
  return res


def crown_tightness(seeds: int = 5, batch: int = 32) -> dict:
  """How often CROWN-IBP and full CROWN give a higher margin lower bound than
  IBP, on untrained random nets (default initialisers; inputs uniform pixels,
  labels the clean predictions), per (sample, class j != y) bound, and the
  fraction of samples each certifies. A figure, not a test: it depends on the
  nets and on ε."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cerdeq_jax import crown, ibp, layers, linf_ball, models

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, labels=None):
      x = layers.Flatten()(x)
      for _ in range(3):
        x = layers.ReLU()(layers.Dense(64)(x))
      return layers.ElidedDense(10)(x, labels)

  nets = {'mlp_3x64': (MLP(), (batch, 8, 8, 1), (0.002, 0.01, 0.03)),
          'cnn7_w4_bn': (models.create('cnn7', 10, width=4, dense=32), (batch, 12, 12, 1),
                         (0.0005, 0.002, 0.005))}
  res = {}
  for name, (model, shape, epsilons) in nets.items():
    rows = {}
    for eps in epsilons:
      counts = {'crown_ibp': [0, 0], 'crown': [0, 0]}
      cert = {'ibp': 0, 'crown_ibp': 0, 'crown': 0}
      total = 0
      for seed in range(seeds):
        x = jax.random.uniform(jax.random.PRNGKey(100 + seed), shape)
        variables = model.init(jax.random.PRNGKey(seed), x)
        labels = jnp.argmax(model.apply(variables, x), -1)
        box = linf_ball(x, eps)
        others = ~jax.nn.one_hot(labels, 10, dtype=bool)
        for inter in ('ibp', 'crown'):
          b, _ = jax.jit(lambda v, x, box, y, inter=inter: crown.clean_and_bounds(
              model, v, x, box, y, False, intermediate=inter))(variables, x, box, labels)
          key = 'crown_ibp' if inter == 'ibp' else 'crown'
          counts[key][0] += int(jnp.sum(others & (b.crown > b.ibp + 1e-6)))
          counts[key][1] += int(jnp.sum(others))
          cert[key] += int(jnp.sum(ibp.certified(b.crown, labels)))
        cert['ibp'] += int(jnp.sum(ibp.certified(b.ibp, labels)))
        total += batch
      rows[f'eps={eps:g}'] = {
          **{f'{k}_beats_ibp': c[0] / c[1] for k, c in counts.items()},
          **{f'certified_{k}': v / total for k, v in cert.items()}}
    res[name] = rows
  res['setup'] = f'{seeds} random nets each, batch {batch}; ε in pixel units (mean 0, std 1)'
  return res


def deq_step_weight(batch_size: int, rounds: int) -> dict:
  """`experiments.bench_deq`: the certified CerDEQ step's peak memory and time
  against the natural step (each in a fresh process, which it starts itself),
  ``rounds`` alternating rounds."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, '-m', 'experiments.bench_deq',
                        f'--batch_size={batch_size}', f'--rounds={rounds}'], check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out[out.index('{'):])['step']


def data_feed(repeats: int, batch_size: int) -> dict:
  """Host input pipeline throughput (augment + normalise + batch), CIFAR-sized."""
  import numpy as np
  from cerdeq_jax import data
  rng = np.random.RandomState(0)
  ds = data.Dataset(rng.randint(0, 256, (10 * batch_size, 32, 32, 3), dtype=np.uint8),
                    rng.randint(0, 10, 10 * batch_size).astype(np.int32), 10,
                    (0.5,) * 3, (0.25,) * 3, 'synthetic')
  times = []
  for r in range(repeats):
    t = time.perf_counter()
    for _ in data.epoch_batches(ds, batch_size, 0, r, augment_pad=2, flip=True):
      pass
    times.append(time.perf_counter() - t)
  t = sorted(times)[len(times) // 2]
  return {'images_per_s': ds.num_examples / t}


def main(argv):
  del argv
  import jax
  measured = {'machine': f'{platform.machine()}, {jax.devices()[0].device_kind}, '
                         f'{jax.device_count()} device(s), jax {jax.__version__}',
              'command': 'python -m experiments.benchmark ' + ' '.join(
                  f'--{name}={FLAGS[name].value}' for name in ('suite', 'repeats', 'batch_size')),
              'date': time.strftime('%Y-%m-%d %H:%M'),
              'load_average_1min_at_start': os.getloadavg()[0]}
  results = {}
  if FLAGS.suite in ('core', 'all'):
    results['core'] = core(FLAGS.repeats)
  if FLAGS.suite in ('train', 'all'):
    results['train'] = train(max(2, FLAGS.repeats // 2), FLAGS.batch_size, crown=True,
                             linf_width=1024)
  if FLAGS.suite in ('data', 'all'):
    results['data'] = data_feed(FLAGS.repeats, FLAGS.batch_size)
  if FLAGS.suite in ('linf', 'all'):
    results['linf'] = linf(FLAGS.repeats)
  if FLAGS.suite in ('crown', 'all'):
    results['crown'] = crown_tightness()
  if FLAGS.suite in ('deq', 'all'):
    results['deq'] = deq_step_weight(FLAGS.batch_size, FLAGS.repeats)
  print(json.dumps({'measured': measured, **results}, indent=1))
  if FLAGS.out:
    old = {}
    if os.path.exists(FLAGS.out):
      with open(FLAGS.out) as f:
        old = json.load(f)
    with open(FLAGS.out, 'w') as f:
      json.dump(merged(old, results, measured), f, indent=1)


if __name__ == '__main__':
  app.run(main)
