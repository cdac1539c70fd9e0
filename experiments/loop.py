"""`train_and_evaluate(config, workdir)`: the certified training loop.

Writes into ``workdir`` (a local folder or ``gs://...``: `run_files`):
``checkpoints/``, ``metrics.jsonl`` (one line per epoch), ``results.json``
(final evaluation on the whole test split) and PNG plots; process 0 writes all
but the checkpoints, which every process saves together. Interrupted runs
resume exactly (the data order and augmentation are functions of (seed, epoch,
step), and the step is in the checkpoint); SIGTERM to any process makes every
process save the same step and exit cleanly (`preemption`).
"""
from __future__ import annotations

import logging
import time

import jax
import numpy as np

from cerdeq_jax import (checkpointing, data, linf_training, models, parametrize, reparam,
                        schedules, solvers, training)
from experiments import plots, preemption, run_files
from experiments.config import Config

log = logging.getLogger(__name__)


def build_model(config: Config, dataset: data.Dataset, evaluation: bool = False):
  """The model of ``config``; with ``evaluation``, its DEQ solves run to
  ``eval_tol`` (same parameters, tighter certificates)."""
  tol, max_iter = ((config.eval_tol, config.eval_max_iter) if evaluation
                   else (config.tol, config.max_iter))
  solver = (solvers.Anderson(tol, max_iter, memory=config.anderson_memory)
            if config.solver == 'anderson' else solvers.Picard(tol, max_iter))
  image_size = dataset.image_shape[0]
  return models.create(
      config.model, dataset.num_classes, image_size=image_size, width=config.width,
      depth=config.depth, deq_scale=config.deq_scale, dense=config.dense,
      solver=solver,
      deq_stride=config.deq_stride, tail_strides=config.tail_strides,
      deq_param_mode=config.deq_param_mode, deq_bound=config.deq_bound,
      batch_norm=config.batch_norm)


def parametrization_of(model) -> parametrize.Parametrization | None:
  return getattr(model, 'parametrization', None)


class UsageError(ValueError):
  """A run that cannot start as asked (reported as one line, no traceback)."""


def load_splits(config: Config) -> tuple[data.Dataset, data.Dataset]:
  """``(train, evaluation)``: the test split, or with ``validation_examples``
  > 0 that many examples held out of the training split (never trained on).
  ``train_examples`` / ``test_examples`` then take the first N of each."""
  train = data.load(config.dataset, 'train', data_dir=config.data_dir)
  if config.validation_examples:
    train, held_out = data.holdout(train, config.validation_examples)
  else:
    held_out = data.load(config.dataset, 'test', data_dir=config.data_dir)
  return data.subset(train, config.train_examples), data.subset(held_out, config.test_examples)


def evaluate(steps: training.Steps, state, dataset: data.Dataset, config: Config, eps: float,
             key, limit: int | None = None, progress: bool = False) -> dict:
  """Standard, PGD and certified error (in %) and interval-solver statistics."""
  t0 = time.time()
  ds = data.subset(dataset, limit)
  sums: dict = {}
  batches = data.epoch_batches(ds, config.batch_size, config.seed, 0, shuffle=False,
                               drop_remainder=False, process_index=jax.process_index(),
                               process_count=jax.process_count())
  n_batches = data.steps_per_epoch(ds.num_examples, config.batch_size, False)
  if progress:
    batches = _bar(batches, n_batches, 'eval')
  for i, batch in enumerate(batches):
    out = jax.device_get(steps.evaluate(state, batch, jax.random.fold_in(key, i), eps))
    for k, v in out.items():
      if k.endswith('_max') or k == 'deq_lipschitz':
        sums[k] = max(sums.get(k, 0.0), float(v))
      else:
        sums[k] = sums.get(k, 0.0) + float(v)
  n = sums['count']
  result = {'examples': int(n), 'eps': eps,
            'standard_error': 100 * (1 - sums['correct'] / n),
            'pgd_error': 100 * (1 - sums['pgd_robust'] / n),
            'certified_error': 100 * (1 - sums['certified'] / n),
            'certified_but_broken': int(sums['certified_but_broken'])}
  if 'certified_crown' in sums:  # certified by IBP or by CROWN(-IBP): config.verifier
    result['certified_crown_error'] = 100 * (1 - sums['certified_crown'] / n)
  result['eval_time_s'] = time.time() - t0
  if 'deq_iterations_sum' in sums:
    result.update(deq_iterations_mean=sums['deq_iterations_sum'] / n,
                  deq_iterations_max=sums['deq_iterations_max'],
                  deq_converged=100 * sums['deq_converged'] / n,
                  deq_residual_max=sums['deq_residual_max'],
                  deq_lipschitz=sums['deq_lipschitz'])
  return result


def _bar(iterable, total, desc, initial=0):
  if jax.process_index() != 0:
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True,
              mininterval=2.0)


def setup(config: Config, train_ds: data.Dataset):
  """Model, step config, lr schedule, optimiser, mesh, initial state and the
  compiled steps of a run: ``(model, cfg, lr, tx, mesh, state, steps)``."""
  if config.batch_size % jax.device_count():
    raise UsageError(f'--batch_size={config.batch_size} is not a multiple of the '
                     f'{jax.device_count()} devices: each device takes an equal share of the '
                     'global batch')
  model = build_model(config, train_ds)
  spe = data.steps_per_epoch(train_ds.num_examples, config.batch_size, True)
  if spe == 0:
    raise UsageError(f'{train_ds.num_examples} training examples are fewer than one batch '
                     f'of {config.batch_size}')
  linf = None
  if config.model in models.LINF_MODELS:
    linf = linf_training.LinfTraining(
        config.linf_eps_train or config.eps, spe, config.eps_start_epochs,
        config.eps_length_epochs, config.p_start, config.p_end, *config.p_epochs,
        config.linf_loss, config.hinge_mix, config.linf_kappa)
  cfg = training.CertifiedTraining(
      eps=config.eps, mean=train_ds.mean, std=train_ds.std, steps_per_epoch=spe,
      eps_start_epochs=config.eps_start_epochs, eps_length_epochs=config.eps_length_epochs,
      loss=config.loss, reg_lambda=0.0 if linf else config.reg_lambda,
      parametrization=parametrization_of(model),
      method='linf_dist' if linf else config.method, linf=linf,
      precision=config.train_precision)
  if linf:  # the published optimiser (ℓp weight decay, cosine lr)
    tx, lr = linf_training.optimizer(config.lr, spe, config.epochs, config.weight_decay, linf)
  else:
    lr = schedules.learning_rate(config.lr, spe, config.milestones)
    tx = schedules.optimizer(lr, config.clip_norm)
  mesh = training.make_mesh()
  sample = np.zeros((config.batch_size,) + train_ds.image_shape, np.float32)
  state = training.init_state(model, tx, jax.random.PRNGKey(config.seed), sample[:1],
                              cfg.parametrization)
  state = training.replicate(mesh, state)
  steps = training.Steps(model, tx, cfg, mesh, config.pgd_steps, config.pgd_restarts,
                         None if config.verifier == 'ibp' else config.verifier,
                         config.crown_max_neurons, build_model(config, train_ds, evaluation=True))
  return model, cfg, lr, tx, mesh, state, steps


def time_train_step(config: Config, repeats: int = 20) -> dict:
  """``seconds_per_step``: the median wall time of one certified train step at
  full ε on real batches (after compilation), the unit of a study's time
  budgets; and ``steps_per_epoch``. CROWN-IBP also gets
  ``seconds_per_crown_step``: a step of the ε ramp, where the loss adds the
  CROWN-IBP bound (β > 0) and costs more than the IBP step after it."""
  train_ds, _ = load_splits(config)
  _, cfg, _, _, mesh, state, steps = setup(config, train_ds)
  spe = cfg.steps_per_epoch

  def median_time(state, step):  # the step donates its state: it flows through
    state = state.replace(step=training.replicate(mesh, np.int32(step)))
    batches = data.epoch_batches(train_ds, config.batch_size, config.seed, 0,
                                 augment_pad=config.augment_pad, flip=config.flip)
    times = []
    for _, batch in zip(range(repeats + 1), batches):
      t = time.perf_counter()
      state, m = steps.train(state, batch, step)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    return state, float(np.median(times[1:]))

  full_eps = round((cfg.eps_start_epochs + cfg.eps_length_epochs) * spe)
  state, seconds = median_time(state, full_eps)
  out = {'seconds_per_step': seconds, 'steps_per_epoch': spe}
  if config.method == 'crown_ibp':
    mid_ramp = round((cfg.eps_start_epochs + cfg.eps_length_epochs / 2) * spe)
    if not cfg.is_crown_step(mid_ramp):
      raise UsageError('--calibrate: the schedule has no CROWN-IBP step to time')
    _, out['seconds_per_crown_step'] = median_time(state, mid_ramp)
  return out


def train_and_evaluate(config: Config, workdir: str) -> dict:
  is_main = jax.process_index() == 0
  work = run_files.workdir_path(workdir)
  train_ds, test_ds = load_splits(config)
  split = 'validation' if config.validation_examples else 'test'
  model, cfg, lr, tx, mesh, state, steps = setup(config, train_ds)
  spe = cfg.steps_per_epoch

  ckpt = checkpointing.Checkpointer(work / 'checkpoints', config.identity(),
                                   config.keep_checkpoints)
  metrics_path = work / run_files.METRICS
  if config.resume or config.eval_only:
    try:
      restored = ckpt.restore(state)
    except checkpointing.IncompatibleCheckpoint as e:
      raise UsageError(str(e)) from None
    if restored is None and config.eval_only:
      raise FileNotFoundError(f'no checkpoint to evaluate in {work / "checkpoints"}')
    if restored is not None:
      state = training.replicate(mesh, restored)
  elif ckpt.latest_step() is not None:
    raise UsageError(f'{workdir} already holds checkpoints: pass --resume or use a new --workdir')
  step = int(jax.device_get(state.step))
  key = jax.random.PRNGKey(config.seed + 1)
  total_steps = max(1, round(config.epochs * spe))  # a fractional last epoch is partial
  if is_main:
    run_files.truncate_metrics(metrics_path, step)
    print(f'{config.model} on {config.dataset}: {train_ds.num_examples} train / '
          f'{test_ds.num_examples} {split}, {spe} steps per epoch, {total_steps} steps, '
          f'{jax.device_count()} device(s), {jax.process_count()} process(es); '
          f'starting at step {step}', flush=True)

  final_key = jax.random.fold_in(key, 10**6)
  final = None
  stopper = preemption.Stopper(ckpt.reached_preemption)
  interrupted = stop_here = False
  try:
    while step < total_steps and not config.eval_only:
      epoch, start = divmod(step, spe)
      t0, seen, sums, count = time.time(), 0, {}, 0
      batches = data.prefetch(data.epoch_batches(
          train_ds, config.batch_size, config.seed, epoch, augment_pad=config.augment_pad,
          flip=config.flip, process_index=jax.process_index(),
          process_count=jax.process_count(), start_step=start))
      bar = _bar(batches, min(spe, total_steps - epoch * spe),
                 f'epoch {epoch + 1}/{config.epochs:g}', start) if config.progress else batches
      for batch in bar:
        state, m = steps.train(state, batch, step)
        step += 1
        seen += config.batch_size
        m = jax.device_get(m)
        for k, v in m.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
        if config.progress and is_main and hasattr(bar, 'set_postfix'):
          bar.set_postfix(loss=f'{float(m["loss"]):.3f}', eps=f'{float(m.get("eps", 0)):.4f}',
                          img_s=f'{seen / (time.time() - t0):.0f}', refresh=False)
        # Every process asks at every step (the multi-process sync point needs it).
        stop_now = stopper.should_stop(step) or bool(
            config.stop_after_steps and step >= config.stop_after_steps)
        # A stop on an epoch's last step first finishes the epoch (its short
        # evaluation, checkpoint and metrics record), which a resume could not
        # recreate; a stop mid-epoch or on the run's last step (whose evaluation
        # is the long final one, done on resume) saves here and stops.
        stop_here = stop_now and (step % spe != 0 or step >= total_steps)
        # The epoch-end save (with metrics) covers the last step of an epoch
        # and of the run.
        if stop_here or (step % config.checkpoint_every_steps == 0 and step % spe != 0
                         and step < total_steps):
          ckpt.save(state, step)
        interrupted = interrupted or stop_now
        if stop_here or step >= total_steps:
          break
      if hasattr(batches, 'close'):
        batches.close()
      if stop_here:
        break
      record = {'epoch': epoch, 'step': step, 'eps': float(cfg.epsilon(step - 1)),
                'lr': float(lr(step - 1)), 'time_s': time.time() - t0,
                'images_per_s': seen / (time.time() - t0)}
      record.update({f'train_{k}' if not k.startswith('train_') else k: v / count
                     for k, v in sums.items() if k != 'eps'})
      if step < total_steps:
        ev = evaluate(steps, state, test_ds, config, config.eps, jax.random.fold_in(key, epoch),
                      config.eval_examples_per_epoch)
      else:  # the last epoch's evaluation is the final one, on the whole test split
        ev = final = evaluate(steps, state, test_ds, config, config.eps, final_key,
                              progress=config.progress)
      record.update({f'test_{k}': v for k, v in ev.items()})
      ckpt.save(state, step, {'certified_error': ev['certified_error']})
      if is_main:
        run_files.append_metrics(metrics_path, record)
        print(f'epoch {epoch + 1}: loss {record.get("train_loss", float("nan")):.4f} '
              f'eps {record["eps"]:.4f} | {split} standard {ev["standard_error"]:.2f}% '
              f'PGD {ev["pgd_error"]:.2f}% certified {ev["certified_error"]:.2f}% '
              f'({ev["examples"]} examples) | {record["time_s"]:.0f}s', flush=True)
      if interrupted:
        break
  finally:
    stopper.restore()

  if interrupted:  # every process says where it stopped (the same step)
    print(f'stopped at step {step}; checkpoint saved, resume with --resume', flush=True)
    ckpt.close()
    return {}
  if final is None:
    final = evaluate(steps, state, test_ds, config, config.eps, final_key,
                     progress=config.progress)
  final = dict(final)
  final.update(model=config.model, dataset=config.dataset, split=split,
               config=config.to_json(), steps=step, devices=jax.device_count(),
               platform=jax.devices()[0].platform)
  if parametrization_of(model) is not None:
    kernel = reparam.hidden_kernel(state.params['deq'], state.spectral.get('deq'),
                                   parametrization_of(model))
    final['hidden_singular_values'] = np.asarray(
        parametrize.singular_values(kernel)).tolist()
  ckpt.close()
  if is_main:
    epochs_log = run_files.read_metrics(metrics_path)
    final['train_time_s'] = sum(r['time_s'] for r in epochs_log)
    run_files.write_json(work / run_files.RESULTS, final)
    plots.training_curves(epochs_log, work / 'training_curves.png')
    plots.errors_per_epoch(epochs_log, work / 'errors_per_epoch.png')
    print(format_table(final), flush=True)
  return final


def format_table(result: dict) -> str:
  rows = [('standard error', f'{result["standard_error"]:.2f} %'),
          ('PGD error', f'{result["pgd_error"]:.2f} %'),
          ('certified error', f'{result["certified_error"]:.2f} %')]
  if 'certified_crown_error' in result:
    rows.append((f'certified error, IBP or {result.get("config", {}).get("verifier", "CROWN")}',
                 f'{result["certified_crown_error"]:.2f} %'))
  if 'deq_iterations_mean' in result:
    rows += [('DEQ bound iterations (mean / max)',
              f'{result["deq_iterations_mean"]:.1f} / {result["deq_iterations_max"]:.0f}'),
             ('DEQ bound solves converged', f'{result["deq_converged"]:.2f} %'),
             ('DEQ max residual', f'{result["deq_residual_max"]:.2e}'),
             ('contraction bound min(L, rho)', f'{result["deq_lipschitz"]:.4f}')]
  width = max(len(r[0]) for r in rows)
  head = (f'{result["model"]} on {result["dataset"]} {result.get("split", "test")} '
          f'({result["examples"]} examples), '
          f'eps = {result["eps"]:.4g}')
  return '\n'.join([head] + [f'  {name:<{width}}  {value}' for name, value in rows])
