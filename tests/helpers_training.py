"""Shared helpers of test_training / test_checkpointing / test_experiments,
and a subprocess worker that trains a tiny model and writes an ``.npz``.

    python tests/helpers_training.py '<json spec>'

Compilation dominates the cost of these tests on CPU, so every subprocess
gets `FAST_XLA_FLAGS` (XLA:CPU without its expensive LLVM passes: ~5x faster
to compile, the same arithmetic up to float rounding) and a persistent
compilation cache shared by the runs of one test session. Whatever is
compared within a test runs under the same flags.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'

# Training setup shared by the worker and the tests (the tests recompute the
# ε schedule from it).
IMAGE_SIZE = 8
NUM_CLASSES = 4
BATCH = 16               # divisible by 8 devices and by 2 processes
TRAIN_EXAMPLES = 32      # -> 2 steps per epoch
MEAN, STD = (0.2,), (0.3,)
SCHEDULE = dict(steps_per_epoch=2, eps_start_epochs=2.0, eps_length_epochs=2.0)


# --- processes ------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def subprocess_env(cache_dir: str | None = None, devices: int | None = None) -> dict:
  """Environment of a JAX subprocess: CPU only, fast compilation, optional
  shared compilation cache and forced device count."""
  env = dict(os.environ)
  flags = FAST_XLA_FLAGS
  if devices:
    flags += f' --xla_force_host_platform_device_count={devices}'
  env.update(XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             PYTHONPATH=os.pathsep.join([REPO] + [p for p in [env.get('PYTHONPATH')] if p]),
             TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('CERDEQ_DATA_DIR', None)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def run_on_devices(script: str, *args: str, devices: int = 4, timeout: float = 300):
  """Runs ``python -c script *args`` on ``devices`` forced CPU devices; the
  JSON of its last line of output."""
  out = subprocess.run([sys.executable, '-c', script, *args], cwd=REPO, timeout=timeout,
                       env=subprocess_env(devices=devices), capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def start_worker(spec: dict, env: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def finish_worker(proc: subprocess.Popen, timeout: float = 400) -> str:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    raise AssertionError(f'worker timed out after {timeout}s:\n{out[-4000:]}') from None
  if proc.returncode != 0:
    raise AssertionError(f'worker exited with {proc.returncode}:\n{out[-6000:]}')
  return out


def load_npz(path: str) -> dict:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assert_trees_close(a: dict, b: dict, prefix: str, rtol: float, atol: float):
  """Compares the ``prefix/...`` entries of two worker outputs."""
  keys_a = sorted(k for k in a if k.startswith(prefix + '/'))
  keys_b = sorted(k for k in b if k.startswith(prefix + '/'))
  assert keys_a == keys_b and keys_a, (keys_a, keys_b)
  for k in keys_a:
    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


# --- data -----------------------------------------------------------------------

def quadrant_images(n: int, size: int, seed: int):
  """uint8 ``(n, size, size)`` images: dim noise, one bright quadrant; the
  label is the quadrant (0..3). Easy to learn, and robust at ε = 0.1 since the
  bright and dark pixel levels are > 0.6 apart."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n).astype(np.uint8)
  images = rng.integers(0, 40, (n, size, size)).astype(np.uint8)
  h = size // 2
  for i, y in enumerate(labels):
    r, c = divmod(int(y), 2)
    images[i, r * h:(r + 1) * h, c * h:(c + 1) * h] = rng.integers(200, 256, (h, h))
  return images, labels


def quadrant_dataset(n: int, seed: int, size: int = IMAGE_SIZE):
  from cerdeq_jax import data
  images, labels = quadrant_images(n, size, seed)
  return data.Dataset(images[..., None], labels.astype(np.int32), NUM_CLASSES, MEAN, STD,
                      'quadrants')


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array in the IDX format (gzip-compressed, as distributed):
  two zero bytes, type code 0x08, ndim, big-endian uint32 sizes, payload."""
  import gzip
  import struct
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.tobytes())


def write_fashion_mnist(folder: str, train: int = 256, test: int = 64) -> str:
  """Tiny Fashion-MNIST look-alike (28x28 quadrant images, labels 0..3) as the
  four IDX files the loader expects."""
  os.makedirs(folder, exist_ok=True)
  for prefix, n, seed in (('train', train, 11), ('t10k', test, 12)):
    images, labels = quadrant_images(n, 28, seed)
    write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), labels)
  return folder


def tiny_model(name: str):
  from cerdeq_jax import models, solvers
  if name == 'cnn7':
    return models.create('cnn7', NUM_CLASSES, image_size=IMAGE_SIZE, width=4, dense=16)
  return models.create(name, NUM_CLASSES, image_size=IMAGE_SIZE, width=4, dense=16,
                       deq_stride=2, solver=solvers.Anderson(tol=1e-3, max_iter=20))


def optimizer(lr: float):
  """The Fast-IBP optimiser (clipping + Adam) with Adam's epsilon at 1e-3
  instead of 1e-8. The biases in front of BatchNorm get exactly zero gradient
  in exact arithmetic, i.e. pure rounding noise (~1e-7) in practice, which
  Adam with eps = 1e-8 turns into full steps of +-lr; then two runs that agree
  to float rounding (1 vs 8 devices) differ by ~lr in those (irrelevant)
  parameters. Real gradients here are >= 1e-3, so training is unaffected."""
  import optax
  return optax.chain(optax.clip_by_global_norm(10.0), optax.adam(lr, eps=1e-3))


def certified_training(model, eps: float):
  from cerdeq_jax import training
  return training.CertifiedTraining(eps=eps, mean=MEAN, std=STD,
                                    parametrization=getattr(model, 'parametrization', None),
                                    **SCHEDULE)


# --- compiled programs ----------------------------------------------------------

_COLLECTIVE = re.compile(
    r'= .*?\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(')


def collectives_in_loops(hlo: str) -> tuple[int, list[str]]:
  """Reads the text of a compiled (SPMD-partitioned) HLO module: the number of
  ``while`` loops, and every collective reachable from a loop's condition or
  body (through nested calls, fusions and loops). XLA:CPU runs a loop
  asynchronously, so a collective inside one may race with an independent
  collective outside it; gloo pairs collectives by order across processes."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  callees = {n: re.findall(r'(?:condition|body|to_apply|calls|branch_computations)=\{?%?([\w.\-]+)',
                           '\n'.join(lines)) for n, lines in bodies.items()}
  loops = [re.findall(r'(?:condition|body)=%?([\w.\-]+)', line)
           for lines in bodies.values() for line in lines if ' while(' in line]
  seen, stack = set(), [c for loop in loops for c in loop]
  while stack:
    comp = stack.pop()
    if comp not in seen and comp in bodies:
      seen.add(comp)
      stack.extend(callees[comp])
  found = [f'{comp}: {line.strip()[:120]}' for comp in sorted(seen) for line in bodies[comp]
           if _COLLECTIVE.search(line)]
  return len(loops), found


# --- worker ---------------------------------------------------------------------

def _flat(prefix: str, tree) -> dict:
  import flax
  import jax
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree) if tree else {}, sep='/')
  # Replicated arrays: every process holds the full value in its local shard.
  return {f'{prefix}/{k}': np.asarray(jax.device_get(v.addressable_data(0))
                                      if hasattr(v, 'addressable_data') else v)
          for k, v in flat.items()}


def _strong_pgd(model, variables, pixels, labels, eps, key, steps, restarts):
  """An attack written for the tests (not `cerdeq_jax.attacks`): margin loss,
  random starts, decaying step, in pixel space clipped to [0, 1]. Returns a
  bool ``(N,)``: some visited point was misclassified."""
  import jax
  import jax.numpy as jnp
  step = _pgd_step(model)
  lower = jnp.clip(pixels - eps, 0.0, 1.0)
  upper = jnp.clip(pixels + eps, 0.0, 1.0)
  broken = np.zeros(labels.shape, bool)
  for r in range(restarts):
    z = pixels if r == 0 else jax.random.uniform(jax.random.fold_in(key, r), pixels.shape,
                                                 pixels.dtype, lower, upper)
    for i in range(steps):
      size = 0.25 * eps * (1.0 - 0.9 * i / steps)
      z, wrong = step(variables, z, lower, upper, labels, size)
      broken |= np.asarray(wrong)
    broken |= np.asarray(step(variables, z, lower, upper, labels, 0.0)[1])
  return broken


_PGD_STEPS = {}


def _pgd_step(model):
  """One jitted sign-gradient step on the margin ``max_{j != y} logit_j - logit_y``;
  also returns which inputs (before the step) are misclassified."""
  if model in _PGD_STEPS:
    return _PGD_STEPS[model]
  import jax
  import jax.numpy as jnp
  mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)

  def margin(variables, z, labels):
    logits = model.apply(variables, (z - mean) / std, train=False)
    true = jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(labels, logits.shape[-1]) > 0, -jnp.inf, logits), -1)
    return jnp.sum(other - true), jnp.argmax(logits, -1) != labels

  @jax.jit
  def step(variables, z, lower, upper, labels, size):
    (_, wrong), g = jax.value_and_grad(margin, argnums=1, has_aux=True)(variables, z, labels)
    return jnp.clip(z + size * jnp.sign(g), lower, upper), wrong

  _PGD_STEPS[model] = step
  return step


def worker(spec: dict) -> None:
  """Trains ``spec['steps']`` steps of ``spec['model']`` on the quadrant data
  (optionally as process ``process_id`` of ``num_processes``) and writes
  ``spec['out']``: ``params/...``, ``batch_stats/...``, ``spectral/...``
  (final), ``init_*/...``, ``snap_*/...`` (after ``spec['snapshot']`` steps),
  ``eps`` (metrics['eps'] per step, 0 on natural steps), ``spectral_trace``
  (the flattened SN vectors after every step), and with ``spec['evaluate']``,
  for each radius ``r`` of ``spec['eval_eps']`` on a 64-example test set:
  ``eval{r}/...`` (summed `eval_step` outputs), ``certified_mask{r}`` (the
  certification test redone per sample), ``strong_pgd_broken{r}`` (`_strong_pgd`),
  and ``clean_correct``."""
  import time
  t0 = time.time()
  log = lambda *a: print(f'[{time.time() - t0:6.1f}s wall {time.process_time():6.1f}s cpu]', *a,
                         flush=True)
  import jax
  import jax.numpy as jnp
  if spec.get('num_processes'):
    jax.distributed.initialize(spec['coordinator'], spec['num_processes'], spec['process_id'])
  from cerdeq_jax import data, training
  from cerdeq_jax.interval import Interval, linf_ball

  log('start')
  model = tiny_model(spec['model'])
  eps = spec.get('eps', 0.1)
  cfg = certified_training(model, eps)
  tx = optimizer(spec.get('lr', 1e-2))
  mesh = training.make_mesh()
  train = quadrant_dataset(TRAIN_EXAMPLES, seed=1)
  # Jitted: op-by-op initialisation of a DEQ compiles every primitive.
  state = jax.jit(lambda key: training.init_state(
      model, tx, key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32),
      cfg.parametrization))(jax.random.PRNGKey(0))
  log('initialised')
  out = {}
  out.update(_flat('init_params', state.params))
  out.update(_flat('init_spectral', state.spectral))
  state = training.replicate(mesh, state)
  steps = training.Steps(model, tx, cfg, mesh, pgd_steps=5, pgd_restarts=1)
  pi, pc = jax.process_index(), jax.process_count()
  spe = data.steps_per_epoch(train.num_examples, BATCH, True)
  eps_trace, spectral_trace, step = [], [], 0
  while step < spec['steps']:
    for batch in data.epoch_batches(train, BATCH, 0, step // spe, process_index=pi,
                                    process_count=pc, start_step=step % spe):
      state, metrics = steps.train(state, batch, step)
      step += 1
      eps_trace.append(float(jax.device_get(metrics.get('eps', 0.0))))
      log(f'step {step}', {k: round(float(v), 4) for k, v in jax.device_get(metrics).items()
                          if k in ('loss', 'eps', 'train_accuracy', 'train_certified')})
      if state.spectral:
        spectral_trace.append(np.concatenate(
            [v.ravel() for v in _flat('s', state.spectral).values()]))
      if step == spec.get('snapshot'):
        out.update(_flat('snap_params', state.params))
        out.update(_flat('snap_batch_stats', state.batch_stats))
      if step == spec['steps']:
        break
  out.update(_flat('params', state.params))
  out.update(_flat('batch_stats', state.batch_stats))
  out.update(_flat('spectral', state.spectral))
  out['eps'] = np.asarray(eps_trace)
  out['device_count'] = np.asarray(jax.device_count())
  if spec.get('hlo_check'):
    out.update(_loop_collectives(steps, state, batch, mesh, sorted(
        {cfg.step_kind(s) for s in range(spec['steps'])})))
  out['process_count'] = np.asarray(jax.process_count())
  if spectral_trace:
    out['spectral_trace'] = np.stack(spectral_trace)

  if spec.get('evaluate'):
    log('eval')
    test = quadrant_dataset(spec.get('test_examples', 64), seed=2)
    variables = jax.device_get(state.variables())
    pixels = test.images.astype(np.float32) / 255.0
    x = (pixels - np.asarray(MEAN)) / np.asarray(STD)
    labels = test.labels
    bounds = jax.jit(lambda v, x, lo, hi, y: training.clean_and_bounds(
        model, v, x, Interval(lo, hi), y, train=False, mutable=['deq_stats']))
    for r, radius in enumerate(spec['eval_eps']):
      sums = {}
      for i, batch in enumerate(data.epoch_batches(test, BATCH, 0, 0, shuffle=False,
                                                   drop_remainder=False)):
        res = jax.device_get(steps.evaluate(state, batch, jax.random.PRNGKey(i), radius))
        for k, v in res.items():
          reduce = max if k.endswith('_max') or k == 'deq_lipschitz' else (lambda a, b: a + b)
          sums[k] = reduce(sums.get(k, 0.0), float(v))
      out.update({f'eval{r}/{k}': np.asarray(v) for k, v in sums.items()})
      # Which samples are certified: the test of eval_step, per sample, here.
      box = linf_ball(x, radius, MEAN, STD)
      (logits, margins), cols = bounds(variables, x, box.lower, box.upper, labels)
      correct = np.argmax(logits, -1) == labels
      others = np.arange(NUM_CLASSES) != labels[:, None]
      cert = correct & np.all(~others | (np.asarray(margins) > 0), -1)
      for s in training.sown(cols.get('deq_stats'), 'interval'):
        cert &= np.asarray(s.certifiable)
      out[f'certified_mask{r}'] = cert
      out['clean_correct'] = correct
      log(f'strong pgd at {radius}')
      out[f'strong_pgd_broken{r}'] = _strong_pgd(
          model, variables, jnp.asarray(pixels), jnp.asarray(labels), radius,
          jax.random.PRNGKey(7 + r), spec.get('strong_steps', 40), spec.get('strong_restarts', 3))
  if jax.process_count() > 1:
    path = spec['out'].replace('.npz', f'.{jax.process_index()}.npz')
  else:
    path = spec['out']
  np.savez(path, **out)
  log('done')
  if spec.get('num_processes'):
    jax.distributed.shutdown()


def _loop_collectives(steps, state, batch, mesh, kinds) -> dict:
  """`collectives_in_loops` of the compiled train steps of ``kinds`` and of the
  eval step, and of a loop that does hold one (the detector finds it)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cerdeq_jax import training
  batch = training.global_batch(mesh, batch)
  texts = [steps.compiled_train(k).lower(state, batch).compile().as_text() for k in kinds]
  texts.append(steps.compiled_eval().lower(state, batch, jax.random.PRNGKey(0),
                                 jnp.float32(0.1)).compile().as_text())
  loops, found = zip(*map(collectives_in_loops, texts))
  x = jax.device_put(jnp.ones(mesh.size * 2), NamedSharding(mesh, P(training.DATA_AXIS)))
  global_loop = jax.jit(lambda x: jax.lax.while_loop(lambda x: jnp.any(x < 4), lambda x: x * 2, x))
  _, positive = collectives_in_loops(global_loop.lower(x).compile().as_text())
  for f in filter(None, found):
    print('collective in a loop:', *f[:5], sep='\n  ')
  return {'loops': np.asarray(loops), 'loop_collectives': np.asarray([len(f) for f in found]),
          'detector_positive': np.asarray(len(positive))}


if __name__ == '__main__':
  worker(json.loads(sys.argv[1]))
