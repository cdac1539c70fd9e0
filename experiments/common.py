"""The flags shared by all experiments.

An experiment module defines its defaults and calls `main_with_defaults`; the
flow is absl flags -> `Config` (`experiments.config`, validated before any
work) -> `train_and_evaluate(config, workdir)`.
"""
from __future__ import annotations

import dataclasses
import fractions
import json
import os
import socket
import sys

from absl import app, flags

from experiments.config import (  # pylint: disable=unused-import  (re-exported)
    ADDED_FIELDS, DATASETS, LINF_MODELS, METHODS, MODELS, RUN_CONTROL, VERIFIERS, Config,
    default_workdir, parse_eps, validate)

FLAGS = flags.FLAGS


def check_workdir(workdir: str) -> str:
  """Creates ``workdir`` (a local folder or a URI such as ``gs://bucket/run``)
  and checks it is writable (one-line ValueError otherwise); returns it, local
  paths made absolute."""
  from experiments import run_files  # epath: no JAX
  path = run_files.workdir_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    # One probe per process: the processes of a pod share the workdir.
    probe = path / f'.write_test.{socket.gethostname()}.{os.getpid()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ValueError(f'--workdir={workdir!r} cannot be written: {e.strerror or e}') from None
  return str(path)


def define_flags(defaults: Config) -> None:
  """absl flags mirroring `Config`, with the experiment's defaults."""
  d = defaults
  flags.DEFINE_string('eps', str(fractions.Fraction(d.eps).limit_denominator(1000)),
                      'ℓ∞ radius in [0,1] pixel units, e.g. 8/255 or 0.1.')
  flags.DEFINE_string('model', d.model, f'One of {", ".join(MODELS)}.')
  flags.DEFINE_float('epochs', d.epochs, 'Training epochs (passes; may be fractional).')
  flags.DEFINE_integer('batch_size', d.batch_size, 'Global batch size.')
  flags.DEFINE_integer('seed', d.seed, 'Seed of initialisation, data order and PGD.')
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and plots go '
                      '(default: runs/<dataset>_<model>_eps<eps>_seed<seed>).')
  flags.DEFINE_bool('resume', False, 'Continue from the latest checkpoint in --workdir.')
  flags.DEFINE_bool('eval_only', False, 'Only evaluate the latest checkpoint.')
  flags.DEFINE_integer('train_examples', d.train_examples, 'Use the first N training examples.')
  flags.DEFINE_integer('test_examples', d.test_examples, 'Use the first N test examples.')
  flags.DEFINE_integer('validation_examples', d.validation_examples,
                       'If > 0: hold out that many training images (a fixed draw, never trained '
                       'on) and evaluate on them instead of the test split, to choose options.')
  flags.DEFINE_integer('eval_examples_per_epoch', d.eval_examples_per_epoch,
                       'Test examples evaluated after each epoch (all at the end).')
  flags.DEFINE_integer('width', d.width, 'Base width (model-specific default if unset).')
  flags.DEFINE_integer('depth', d.depth, 'Depth of --model=cnn_depth.')
  flags.DEFINE_integer('dense', d.dense, 'Width of the hidden dense layer.')
  flags.DEFINE_bool('batch_norm', d.batch_norm, 'BatchNorm after each layer (DEQ/CNN models).')
  flags.DEFINE_float('lr', d.lr, 'Adam learning rate.')
  flags.DEFINE_list('milestones', [str(m) for m in d.milestones], 'Epochs where lr x0.2.')
  flags.DEFINE_float('eps_start_epochs', d.eps_start_epochs, 'Epochs at ε = 0.')
  flags.DEFINE_float('eps_length_epochs', d.eps_length_epochs, 'Epochs of the ε ramp.')
  flags.DEFINE_string('loss', d.loss, "'fast_ibp' or 'mixed' (κ annealed 1 -> 0.5).")
  flags.DEFINE_string('method', d.method,
                      "Bound of the certified loss: 'ibp' (Fast-IBP) or 'crown_ibp' "
                      '(β·CROWN-IBP + (1-β)·IBP, β: 1 -> 0 with ε; DEQ models: CROWN after the '
                      'DEQ).')
  flags.DEFINE_float('reg_lambda', d.reg_lambda, 'Weight of the warm-up regularisers.')
  flags.DEFINE_integer('augment_pad', d.augment_pad,
                       'Random-crop edge padding in pixels (0: no crop).')
  flags.DEFINE_bool('flip', d.flip, 'Random horizontal flips.')
  flags.DEFINE_float('deq_scale', d.deq_scale, 'Bound s < 1 on || |W| ||_2 of DEQ weights.')
  flags.DEFINE_integer('deq_stride', d.deq_stride, 'Stride of the DEQ injection (DEQ models).')
  flags.DEFINE_list('tail_strides', d.tail_strides and [str(s) for s in d.tail_strides],
                    'Strides of the three convs after the DEQ (DEQ models), e.g. 2,1,1.')
  flags.DEFINE_string('deq_param_mode', d.deq_param_mode,
                      "'project': the DEQ kernel W is projected after every optimiser step; "
                      "'reparam': W = W(V) of a free V in the forward pass, differentiated.")
  flags.DEFINE_string('deq_bound', d.deq_bound,
                      "'spectral': keep ||S||_2 <= deq_scale; 'rho': keep the (looser) "
                      'Perron-root bound rho(S) <= deq_scale, certified in a weighted sup-norm.')
  flags.DEFINE_string('solver', d.solver, "'anderson' or 'picard'.")
  flags.DEFINE_integer('anderson_memory', d.anderson_memory,
                       'Iterates that Anderson mixes (memory grows with it: batch x memory x '
                       'the DEQ state, twice, for each bound).')
  flags.DEFINE_float('tol', d.tol, 'Relative residual tolerance of DEQ solves.')
  flags.DEFINE_integer('max_iter', d.max_iter, 'Iteration limit of DEQ solves.')
  flags.DEFINE_float('eval_tol', d.eval_tol,
                     'Tolerance of the DEQ solves in evaluation: the certificate widens the '
                     'bounds in proportion to the residual.')
  flags.DEFINE_integer('eval_max_iter', d.eval_max_iter, 'Iteration limit of those solves.')
  flags.DEFINE_integer('pgd_steps', d.pgd_steps, 'PGD steps per restart.')
  flags.DEFINE_integer('pgd_restarts', d.pgd_restarts, 'PGD restarts.')
  flags.DEFINE_string('verifier', d.verifier,
                      "Evaluation bounds: 'ibp'; 'crown_ibp' or 'crown' also report "
                      'certified_crown_error (certified by IBP or by CROWN).')
  flags.DEFINE_integer('crown_max_neurons', d.crown_max_neurons,
                       "--verifier=crown: layers with more neurons per sample keep IBP "
                       'bounds (full CROWN costs a backward pass per neuron).')
  flags.DEFINE_float('weight_decay', d.weight_decay,
                     'ℓ∞-dist models: decoupled weight decay (ℓp on the ℓ∞-dist weights).')
  flags.DEFINE_float('linf_eps_train', d.linf_eps_train,
                     'ℓ∞-dist models: training radius in pixel units (default: --eps).')
  flags.DEFINE_float('p_start', d.p_start, 'ℓ∞-dist models: initial p of the ℓp relaxation.')
  flags.DEFINE_float('p_end', d.p_end, 'ℓ∞-dist models: p at the end of its ramp (then ∞).')
  flags.DEFINE_list('p_epochs', [str(e) for e in d.p_epochs],
                    'ℓ∞-dist models: epochs where p starts growing and where it becomes ∞ '
                    '(the lr decays by a cosine from the first).')
  flags.DEFINE_string('linf_loss', d.linf_loss, "ℓ∞-dist models: 'hinge' or 'cross_entropy'.")
  flags.DEFINE_float('hinge_mix', d.hinge_mix, 'ℓ∞-dist models: weight of the max hinge term.')
  flags.DEFINE_float('linf_kappa', d.linf_kappa,
                     'ℓ∞-dist models: weight of the worst-case loss (1 - it: clean loss).')
  flags.DEFINE_string('data_dir', d.data_dir, 'Folder with the dataset files.')
  flags.DEFINE_integer('checkpoint_every_steps', d.checkpoint_every_steps,
                       'Save a checkpoint every N steps (and at each epoch end).')
  flags.DEFINE_bool('progress', d.progress, 'Show progress bars.')
  flags.DEFINE_string('train_precision', d.train_precision,
                      "Precision of the layers' float32 matmuls/convs in training passes on "
                      "TPU/GPU: 'default' (bf16/TF32 passes), 'high' or 'highest'. DEQ solves, "
                      'bounds L/rho, margins and all of evaluation always run at highest.')
  flags.DEFINE_integer('stop_after_steps', None, 'Stop (with a checkpoint) after N steps.')
  flags.DEFINE_bool('calibrate', False, 'Only time the certified train step; print it as JSON.')
  flags.DEFINE_string('coordinator_address', None,
                      'Multi-process: host:port of process 0 (with --num_processes, --process_id).')
  flags.DEFINE_integer('num_processes', None, 'Multi-process: number of processes.')
  flags.DEFINE_integer('process_id', None, 'Multi-process: this process.')
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM).')


def with_model_defaults(config: Config, model_defaults: dict | None,
                        explicit=()) -> Config:
  """``config`` with ``model_defaults[config.model]`` (an experiment's
  published defaults for one model, e.g. the ℓ∞-dist Nets') for every field not
  in ``explicit`` (the flags given on the command line)."""
  overrides = (model_defaults or {}).get(config.model, {})
  return dataclasses.replace(config, **{k: v for k, v in overrides.items() if k not in explicit})


def _numbers(name: str, kind: type) -> tuple:
  """The list flag ``name`` as a tuple of ``kind``; a one-line error otherwise."""
  try:
    return tuple(kind(item) for item in FLAGS[name].value)
  except ValueError:
    raise ValueError(f'--{name}={",".join(FLAGS[name].value)} must be '
                     f'{"integers" if kind is int else "numbers"}') from None


def config_from_flags(defaults: Config, model_defaults: dict | None = None) -> Config:
  """``defaults`` with every flag that names a `Config` field (the flags of
  `define_flags`), then the model-specific defaults for the fields no flag set."""
  fields = {f.name for f in dataclasses.fields(Config)}
  values = {name: FLAGS[name].value for name in fields if name in FLAGS}
  values.update(eps=parse_eps(FLAGS.eps), milestones=_numbers('milestones', float),
                p_epochs=_numbers('p_epochs', float),
                tail_strides=_numbers('tail_strides', int) if FLAGS.tail_strides else None)
  config = dataclasses.replace(defaults, **values)
  explicit = {name for name in FLAGS if FLAGS[name].present}
  return validate(with_model_defaults(config, model_defaults, explicit))


def main_with_defaults(defaults: Config, model_defaults: dict | None = None) -> None:
  """Entry point of an experiment module: ``python -m experiments.X --flags``.
  ``model_defaults``: per model name, fields that replace ``defaults`` unless
  given as flags (see `with_model_defaults`)."""
  define_flags(defaults)

  def main(argv):
    if len(argv) > 1:
      _fail(f'unexpected arguments: {" ".join(argv[1:])}')
    try:
      config = config_from_flags(defaults, model_defaults)
      workdir = check_workdir(FLAGS.workdir or default_workdir(config))
    except ValueError as e:
      _fail(str(e))
    print(f'workdir: {workdir}' + ('' if FLAGS.workdir else ' (default; set --workdir to change)'),
          flush=True)
    _init_distributed()
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    from experiments import loop  # heavy imports only after validation
    try:
      if FLAGS.calibrate:
        print(json.dumps(loop.time_train_step(config)), flush=True)
      else:
        loop.train_and_evaluate(config, workdir)
    except (FileNotFoundError, loop.UsageError) as e:
      _fail(str(e))

  app.run(main)


def _init_distributed():
  if FLAGS.coordinator_address or FLAGS.distributed:
    import jax
    if FLAGS.coordinator_address:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    else:
      jax.distributed.initialize()


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
