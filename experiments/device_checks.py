"""The pieces of the accelerator check (`experiments.accelerator_check`).

Flag-free functions, so that tests can import them: the device test run, the
device-vs-CPU evaluation of one checkpoint, the precision census of a lowered
program, the train-step timings (`experiments.benchmark.train`) with the
200-epoch CIFAR-10 estimate, and the marked section of docs/performance.md.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_TRAIN_EXAMPLES = 50_000
PAPER_EPOCHS = 200
SECTION_BEGIN = '<!-- accelerator-check:begin (written by `make accelerator-check`) -->'
SECTION_END = '<!-- accelerator-check:end -->'


# --- 1. tests on the device -------------------------------------------------------

def run_tests(files: list[str], workers: int, timeout_s: float, collect_only: bool) -> dict:
  """pytest on ``files`` (not the slow ones) in a subprocess, on the default
  backend. Workers share the accelerator, so none may preallocate its memory.

  The tests' own reference products (plain ``a @ b`` in jnp) run at full
  float32, as on the CPU: on a GPU they would otherwise run in TF32 and miss
  the library's results by ~1e-3. This changes only products without an
  explicit precision; the library's carry theirs (`cerdeq_jax.precision`,
  checked by the precision stage in the unchanged main process)."""
  cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'not slow']
  if collect_only:
    cmd.append('--collect-only')
  elif workers > 1:
    cmd += ['-n', str(workers)]
  cmd += list(files)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false', PYTHONUNBUFFERED='1',
             JAX_DEFAULT_MATMUL_PRECISION='highest')
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=REPO)
    rc, out = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, out = None, f'{e.stdout or ""}\ntimed out after {timeout_s:.0f} s'
  lines = [l for l in out.splitlines() if l.strip()]
  failed = [l for l in lines if l.startswith(('FAILED', 'ERROR'))]
  return {'command': ' '.join(['python'] + cmd[1:]), 'returncode': rc, 'ok': rc == 0,
          'summary': lines[-1] if lines else '', 'failed': failed[:20],
          'seconds': time.perf_counter() - t0}


# --- 2. one checkpoint, evaluated on the device and on the CPU ----------------------

@dataclasses.dataclass(frozen=True)
class TinyRun:
  """A small CerDEQ on synthetic 4-class images (the bright quadrant is the
  label: learnable in a few steps, so margins are not all negative)."""
  image_size: int = 16
  width: int = 8
  dense: int = 32
  batch: int = 64
  steps: int = 40
  lr: float = 5e-3
  eps: float = 2 / 255
  pgd_steps: int = 5


MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def quadrant_batch(n: int, size: int, seed: int) -> dict:
  """Normalised NHWC images and labels (see `TinyRun`)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  images = rng.uniform(0, 0.15, (n, size, size, 3))
  h = size // 2
  for i, y in enumerate(labels):
    r, c = divmod(int(y), 2)
    # Brightness varies per sample, so do margins: some certify, some not.
    level = rng.uniform(0.25, 1.0)
    images[i, r * h:(r + 1) * h, c * h:(c + 1) * h] = level * rng.uniform(0.8, 1.0, (h, h, 3))
  x = ((images - np.array(MEAN)) / np.array(STD)).astype(np.float32)
  return {'image': x, 'label': labels.astype(np.int32), 'mask': np.ones(n, bool)}


def _tiny_model_and_config(run: TinyRun):
  import optax
  from cerdeq_jax import models, solvers, training
  model = models.create('cerdeq', 4, image_size=run.image_size, width=run.width,
                        dense=run.dense, solver=solvers.Anderson(tol=1e-4, max_iter=50))
  # One "epoch" of run.steps: natural steps for the first half, then ε ramps
  # up over a quarter: certified steps, so that some samples certify.
  cfg = training.CertifiedTraining(eps=run.eps, mean=MEAN, std=STD, steps_per_epoch=run.steps,
                                   eps_start_epochs=0.5, eps_length_epochs=0.25, reg_lambda=0.0,
                                   parametrization=getattr(model, 'parametrization', None))
  return model, cfg, optax.adam(run.lr)


def train(run: TinyRun):
  """A few natural, then certified steps on the default backend; the state."""
  from cerdeq_jax import training
  model, cfg, tx = _tiny_model_and_config(run)
  mesh = training.make_mesh()
  state = _initial_state(run, model, cfg, tx, mesh)
  steps = training.Steps(model, tx, cfg, mesh)
  for i in range(run.steps):
    state, _ = steps.train(state, quadrant_batch(run.batch, run.image_size, seed=1 + i), i)
  return state


def _initial_state(run: TinyRun, model, cfg, tx, mesh):
  import jax
  from cerdeq_jax import training
  image = quadrant_batch(run.batch, run.image_size, seed=0)['image'][:1]  # the shapes
  return training.replicate(mesh, training.init_state(model, tx, jax.random.PRNGKey(0), image,
                                                      cfg.parametrization))


def _checkpointer(directory: str):
  from cerdeq_jax import checkpointing
  return checkpointing.Checkpointer(directory, {'check': 'accelerator'}, keep=1)


def save(state, step: int, directory: str) -> None:
  ckpt = _checkpointer(directory)
  ckpt.save(state, step)
  ckpt.close()


def compare_states(a, b) -> dict:
  """Whether two train states (parameters, BatchNorm statistics, optimiser
  state) are equal bit for bit, and by how much they differ if not."""
  import jax
  pairs = list(zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))
  differing = [(x, y) for x, y in pairs if not np.array_equal(x, y, equal_nan=True)]
  return {'bitwise_equal': not differing, 'leaves': len(pairs), 'leaves_differing': len(differing),
          'max_abs_difference': max((float(np.max(np.abs(np.asarray(x, np.float64) - y)))
                                     for x, y in differing), default=0.0)}


def evaluate_checkpoint(run: TinyRun, directory: str, devices) -> dict:
  """Restores the checkpoint onto ``devices`` and evaluates it there: the
  library's certified eval step (sums) and the per-sample margin bounds."""
  import jax
  from cerdeq_jax import training
  from cerdeq_jax.interval import linf_ball
  model, cfg, tx = _tiny_model_and_config(run)
  mesh = training.make_mesh(devices)
  batch = quadrant_batch(run.batch, run.image_size, seed=10_000)
  ckpt = _checkpointer(directory)
  state = ckpt.restore(_initial_state(run, model, cfg, tx, mesh))
  ckpt.close()

  def evaluate(state, batch, key):
    sums = training.eval_step(state, batch, key, model=model, cfg=cfg, eps=run.eps,
                              pgd_steps=run.pgd_steps)
    box = linf_ball(batch['image'], run.eps, cfg.mean, cfg.std)
    (_, margins), _ = training.clean_and_bounds(model, state.variables(), batch['image'], box,
                                                batch['label'], train=False,
                                                mutable=['deq_stats'])
    return sums, margins

  sums, margins = jax.device_get(jax.jit(evaluate)(
      state, training.global_batch(mesh, batch), training.replicate(mesh, jax.random.PRNGKey(1))))
  return {'platform': devices[0].platform, 'labels': batch['label'],
          'sums': {k: float(v) for k, v in sums.items()}, 'margins': np.asarray(margins)}


def compare_evaluations(device: dict, cpu: dict, rtol: float = 1e-4) -> dict:
  """Certified counts and margin bounds of the same checkpoint on two
  backends. ``ok``: equal sample, correct and certified counts, the same
  non-finite (non-certifiable) entries, finite margins within ``rtol`` of the
  CPU's scale, and no certified sample broken by PGD on either. PGD's own
  count is reported, not required equal: an attack is a search whose path may
  change with the summation order, a certificate is not."""
  a, b = device['margins'], cpu['margins']
  finite = np.isfinite(a) & np.isfinite(b)
  same_pattern = bool(np.array_equal(np.isfinite(a), np.isfinite(b)))
  diff = float(np.max(np.abs(a - b)[finite])) if finite.any() else 0.0
  scale = float(np.max(np.abs(b[finite]))) if finite.any() else 0.0
  others = np.arange(a.shape[1])[None] != device['labels'][:, None]
  cert = lambda m: np.all(np.where(others, m > 0, True), axis=1)
  keys = ('count', 'correct', 'certified', 'pgd_robust', 'certified_but_broken')
  counts = {k: (device['sums'].get(k), cpu['sums'].get(k)) for k in keys}
  equal = all(counts[k][0] == counts[k][1] for k in ('count', 'correct', 'certified'))
  unbroken = all(n == 0 for n in counts['certified_but_broken'])
  return {'counts': counts, 'max_abs_margin_difference': diff, 'margin_scale': scale,
          'same_non_finite_margins': same_pattern,
          'samples_certified_differently': int(np.sum(cert(a) != cert(b))),
          'ok': equal and unbroken and same_pattern and diff <= rtol * (1 + scale)}


def device_vs_cpu(run: TinyRun) -> dict:
  """Trains on the default backend, saves, then evaluates on it and on the
  CPU (`jax.devices('cpu')` exists on accelerator machines too). The training
  runs twice, compiled afresh the second time as a resumed run is (on a GPU,
  XLA may then pick other convolution algorithms): ``repeatable`` says whether
  the two final states agree bit for bit, which exact resumption needs."""
  import jax
  first = train(run)
  jax.clear_caches()
  repeatable = compare_states(first, train(run))
  with tempfile.TemporaryDirectory() as tmp:
    directory = os.path.join(tmp, 'checkpoints')
    save(first, run.steps, directory)
    device = evaluate_checkpoint(run, directory, jax.devices())
    cpu = evaluate_checkpoint(run, directory, jax.devices('cpu'))
  result = compare_evaluations(device, cpu)
  result.update(device_platform=device['platform'], run=dataclasses.asdict(run),
                repeatable=repeatable)
  return result


# --- 3. precision of the lowered certified evaluation -----------------------------

def precision_census(hlo_text: str) -> dict:
  """Counts ``dot_general``/``convolution`` ops in lowered StableHLO text and
  how many carry ``HIGHEST`` precision (the others may run in bf16/TF32)."""
  ops = [l for l in hlo_text.splitlines()
         if re.search(r'stablehlo\.(dot_general|convolution)\b', l)]
  return {'dot_general': sum('stablehlo.dot_general' in l for l in ops),
          'convolution': sum('stablehlo.convolution' in l for l in ops),
          'total': len(ops), 'highest': sum('HIGHEST' in l for l in ops)}


#: Programs of `lowered_precision` whose every op must carry HIGHEST (the
#: precision policy, `cerdeq_jax.precision`); the train step is only reported.
ALL_HIGHEST = ('eval_step', 'bounds_pass')


def lowered_precision(run: TinyRun) -> dict:
  """The census of the certified eval step (bounds, PGD, clean logits), of
  its bounds pass alone (what a certificate rests on), and of a certified train
  step at the default training precision, as lowered here. ``ok``: every op of
  `ALL_HIGHEST` carries HIGHEST."""
  import functools
  import jax
  from cerdeq_jax import training
  from cerdeq_jax.interval import linf_ball
  model, cfg, tx = _tiny_model_and_config(run)
  batch = quadrant_batch(8, run.image_size, seed=0)
  state = training.init_state(model, tx, jax.random.PRNGKey(0), batch['image'][:1],
                              cfg.parametrization)
  eval_step = functools.partial(training.eval_step, model=model, cfg=cfg, eps=run.eps,
                                pgd_steps=run.pgd_steps)

  def bounds(state, x, labels):
    box = linf_ball(x, run.eps, cfg.mean, cfg.std)
    return training.clean_and_bounds(model, state.variables(), x, box, labels, train=False,
                                     mutable=['deq_stats'])

  train_step = functools.partial(training.train_step, model=model, tx=tx, cfg=cfg,
                                 kind=training.StepKind(True, False))
  key = jax.random.PRNGKey(0)
  out = {'eval_step': precision_census(jax.jit(eval_step).lower(state, batch, key).as_text()),
         'bounds_pass': precision_census(
             jax.jit(bounds).lower(state, batch['image'], batch['label']).as_text()),
         f'train_step ({cfg.precision})': precision_census(
             jax.jit(train_step).lower(state, {k: batch[k] for k in ('image', 'label')}).as_text())}
  out['ok'] = all(out[k]['highest'] == out[k]['total'] for k in ALL_HIGHEST)
  return out


# --- 4. train-step timings and the 200-epoch estimate -------------------------------

def epochs_200_hours(seconds_per_step: float, batch_size: int) -> float:
  """CIFAR-10 wall time of the paper's 200 epochs, every step certified:
  50,000 / batch x 200 x step time, in hours."""
  return CIFAR10_TRAIN_EXAMPLES / batch_size * PAPER_EPOCHS * seconds_per_step / 3600


def time_train_steps(names, batch_sizes, repeats: int, image_size: int, model_kwargs: dict,
                     deadline: float, reserve_s: float,
                     precisions: tuple[str, ...] = ('default',)) -> dict:
  """`experiments.benchmark.train` per (model, batch) with the layers at
  ``precisions[0]`` (the training default), then per model at the first batch
  size at each other precision (what the default is chosen by: `cerdeq_jax.precision`),
  skipping any that would start with less than ``reserve_s`` seconds left
  before ``deadline``."""
  from experiments import benchmark  # defines its flags: imported only when used
  jobs = [(n, b, precisions[0]) for b in batch_sizes for n in names]
  jobs += [(n, batch_sizes[0], p) for p in precisions[1:] for n in names]
  out = {}
  for name, batch_size, precision in jobs:
    key = f'{name}_batch{batch_size}' + ('' if precision == precisions[0] else f'_{precision}')
    res = {'model': name, 'batch_size': batch_size, 'precision': precision}
    if time.time() + reserve_s > deadline:
      out[key] = {**res, 'skipped': 'time budget'}
      continue
    t0 = time.time()
    res.update(benchmark.train(repeats, batch_size, names=(name,), image_size=image_size,
                               model_kwargs=model_kwargs, precision=precision)[name])
    res.update(wall_s=time.time() - t0,
               epochs_200_hours=epochs_200_hours(res['certified']['seconds_per_step'], batch_size))
    base = out.get(f'{name}_batch{batch_size}', {})
    if precision != precisions[0] and 'certified' in base:
      res['certified_over_default_precision'] = (res['certified']['seconds_per_step']
                                                 / base['certified']['seconds_per_step'])
    out[key] = res
  return out


# --- the marked section of docs/performance.md -------------------------------------

def replace_section(text: str, body: str) -> str:
  """``text`` with the marked accelerator-check section replaced by ``body``
  (appended, with its markers, if there is none)."""
  section = f'{SECTION_BEGIN}\n{body.strip()}\n{SECTION_END}'
  start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
  if start >= 0 and end > start:
    return text[:start] + section + text[end + len(SECTION_END):]
  return text.rstrip('\n') + '\n\n' + section + '\n'
