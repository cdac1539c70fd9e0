"""Flags and the training loop shared by all experiments.

An experiment module defines its defaults and calls `main_with_defaults`; the
flow is absl flags -> `Config` (validated before any work) ->
`train_and_evaluate(config, workdir)`.
"""
from __future__ import annotations

import dataclasses
import fractions
import json
import math
import os
import socket
import sys

from absl import app, flags

FLAGS = flags.FLAGS

DATASETS = ('fashion_mnist', 'cifar10', 'tiny_imagenet')
MODELS = ('cerdeq', 'deq_wn', 'deq_sn', 'cnn7', 'wide_resnet', 'resnext', 'cnn_depth',
          'linf_dist', 'linf_dist_mlp')
LINF_MODELS = ('linf_dist', 'linf_dist_mlp')
METHODS = ('ibp', 'crown_ibp')
VERIFIERS = ('ibp', 'crown_ibp', 'crown')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run. Fields marked run-control in
  `RUN_CONTROL` may change between a run and its resumption."""
  dataset: str = 'cifar10'
  model: str = 'cerdeq'
  eps: float = 8 / 255           # [0, 1] pixel units
  epochs: float = 200            # may be fractional: a budget in passes
  batch_size: int = 128
  seed: int = 0
  lr: float = 5e-4
  milestones: tuple[float, ...] = (120, 140)
  clip_norm: float = 10.0
  eps_start_epochs: float = 1
  eps_length_epochs: float = 80
  loss: str = 'fast_ibp'
  method: str = 'ibp'            # bound of the certified loss: 'ibp' | 'crown_ibp'
  reg_lambda: float = 0.5
  augment_pad: int = 2
  flip: bool = True
  width: int | None = None
  depth: int = 7
  dense: int = 512
  batch_norm: bool = True
  deq_scale: float = 0.95
  deq_stride: int | None = None   # stride of the DEQ's injection (model default if None)
  tail_strides: tuple[int, ...] | None = None  # of the 3 convs after the DEQ (2, 1, 1)
  deq_param_mode: str = 'project'  # W projected after each step, or W(V) reparametrised
  deq_bound: str = 'spectral'    # keep ||S||_2 <= deq_scale, or (looser) rho(S) <= deq_scale
  solver: str = 'anderson'
  tol: float = 1e-4
  max_iter: int = 50
  train_examples: int | None = None
  test_examples: int | None = None
  validation_examples: int = 0   # > 0: evaluate on that many held out of train, not on test
  eval_examples_per_epoch: int | None = 1000
  pgd_steps: int = 10
  pgd_restarts: int = 1
  verifier: str = 'ibp'          # evaluation: 'ibp', or also 'crown_ibp' / 'crown'
  crown_max_neurons: int | None = None  # 'crown': IBP bounds for wider layers
  # ℓ∞-dist Nets (--model=linf_dist|linf_dist_mlp; `cerdeq_jax.linf_training`)
  weight_decay: float = 5e-3     # decoupled, ℓp on the ℓ∞-dist weights
  linf_eps_train: float | None = None  # training radius, pixel units (None: eps)
  p_start: float = 8.0
  p_end: float = 1000.0
  p_epochs: tuple[float, float] = (50.0, 350.0)  # p ramp; lr cosine from the first
  linf_loss: str = 'hinge'       # or 'cross_entropy'
  hinge_mix: float = 1.0
  linf_kappa: float = 1.0        # weight of the worst-case loss
  data_dir: str | None = None
  # run control
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 2
  eval_only: bool = False
  resume: bool = False
  progress: bool = True
  stop_after_steps: int | None = None
  train_precision: str = 'default'  # layer products in training passes (cerdeq_jax.precision)

  def to_json(self) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


RUN_CONTROL = ('checkpoint_every_steps', 'keep_checkpoints', 'eval_only', 'resume', 'progress',
               'stop_after_steps', 'data_dir', 'epochs', 'eval_examples_per_epoch',
               'pgd_steps', 'pgd_restarts', 'test_examples', 'verifier', 'crown_max_neurons',
               'train_precision')
#: Fields added after runs had started, with their default (= the behaviour
#: before them): left out of a checkpoint's identity while at it, so that
#: those runs still resume.
ADDED_FIELDS = {'deq_param_mode': 'project', 'deq_bound': 'spectral', 'method': 'ibp',
                'weight_decay': 5e-3, 'linf_eps_train': None, 'p_start': 8.0, 'p_end': 1000.0,
                'p_epochs': [50.0, 350.0], 'linf_loss': 'hinge', 'hinge_mix': 1.0,
                'linf_kappa': 1.0}


def parse_eps(text: str) -> float:
  """'8/255', '0.1', '2e-3' -> float in [0, 1]; ValueError with one line otherwise."""
  try:
    value = float(fractions.Fraction(text.strip()))
  except (ValueError, ZeroDivisionError):
    raise ValueError(f"--eps={text!r} is not a number or fraction like 8/255") from None
  if not math.isfinite(value) or not 0 <= value <= 1:
    raise ValueError(f'--eps={text!r} must lie in [0, 1] (pixel units)')
  return value


def validate(config: Config) -> Config:
  """One-line ValueErrors for configurations that cannot run."""
  if config.dataset not in DATASETS:
    raise ValueError(f'unknown dataset {config.dataset!r}; choose one of {", ".join(DATASETS)}')
  if config.model not in MODELS:
    raise ValueError(f'unknown --model={config.model!r}; choose one of {", ".join(MODELS)}')
  if not (math.isfinite(config.epochs) and config.epochs > 0):
    raise ValueError(f'--epochs must be a positive number, got {config.epochs}')
  for name in ('batch_size', 'max_iter', 'checkpoint_every_steps', 'keep_checkpoints'):
    if getattr(config, name) <= 0:
      raise ValueError(f'--{name} must be positive, got {getattr(config, name)}')
  for name in ('train_examples', 'test_examples', 'eval_examples_per_epoch'):
    if getattr(config, name) is not None and getattr(config, name) <= 0:
      raise ValueError(f'--{name} must be positive, got {getattr(config, name)}')
  if config.tail_strides is not None and (
      len(config.tail_strides) != 3 or min(config.tail_strides) < 1):
    raise ValueError(f'--tail_strides needs three positive strides, got {config.tail_strides}')
  if config.deq_stride is not None and config.deq_stride < 1:
    raise ValueError(f'--deq_stride must be positive, got {config.deq_stride}')
  if config.validation_examples < 0:
    raise ValueError(f'--validation_examples must be >= 0, got {config.validation_examples}')
  if config.augment_pad < 0:
    raise ValueError(f'--augment_pad must be >= 0, got {config.augment_pad}')
  if not 0 < config.deq_scale < 1:
    raise ValueError(f'--deq_scale must lie in (0, 1), got {config.deq_scale}')
  if config.deq_param_mode not in ('project', 'reparam'):
    raise ValueError(f"--deq_param_mode must be 'project' or 'reparam', got "
                     f'{config.deq_param_mode!r}')
  if config.deq_bound not in ('spectral', 'rho'):
    raise ValueError(f"--deq_bound must be 'spectral' or 'rho', got {config.deq_bound!r}")
  if config.solver not in ('anderson', 'picard'):
    raise ValueError(f"--solver must be 'anderson' or 'picard', got {config.solver!r}")
  if config.loss not in ('fast_ibp', 'mixed'):
    raise ValueError(f"--loss must be 'fast_ibp' or 'mixed', got {config.loss!r}")
  if config.method not in METHODS:
    raise ValueError(f'--method must be one of {", ".join(METHODS)}, got {config.method!r}')
  if config.verifier not in VERIFIERS:
    raise ValueError(f'--verifier must be one of {", ".join(VERIFIERS)}, got {config.verifier!r}')
  if config.model in LINF_MODELS and (config.method != 'ibp' or config.verifier != 'ibp'):
    raise ValueError(f'--model={config.model} trains with its own objective and certifies by '
                     f'intervals at p = ∞: --method and --verifier do not apply')
  if config.linf_loss not in ('hinge', 'cross_entropy'):
    raise ValueError(f"--linf_loss must be 'hinge' or 'cross_entropy', got {config.linf_loss!r}")
  if len(config.p_epochs) != 2 or config.p_epochs[1] < config.p_epochs[0]:
    raise ValueError(f'--p_epochs needs a start and a later end, got {config.p_epochs}')
  if not 1 <= config.p_start <= config.p_end:
    raise ValueError('--p_start and --p_end need 1 <= p_start <= p_end')
  if config.crown_max_neurons is not None and config.crown_max_neurons <= 0:
    raise ValueError(f'--crown_max_neurons must be positive, got {config.crown_max_neurons}')
  if config.train_precision not in ('default', 'high', 'highest'):
    raise ValueError("--train_precision must be 'default', 'high' or 'highest', got "
                     f'{config.train_precision!r}')
  if not math.isfinite(config.eps) or not 0 <= config.eps <= 1:
    raise ValueError(f'--eps must lie in [0, 1], got {config.eps}')
  # An explicit --data_dir that does not exist is a mistake; the loaders would
  # otherwise fall back to $CERDEQ_DATA_DIR or a system copy without a word.
  if config.data_dir is not None and not os.path.exists(os.path.expanduser(config.data_dir)):
    raise ValueError(f'--data_dir={config.data_dir!r} does not exist')
  return config


def default_workdir(config: Config) -> str:
  """``runs/<dataset>_<model>_eps<ε>_seed<seed>``, relative to the current
  folder: a function of the flags alone (no timestamp), so that the same
  command with ``--resume`` or ``--eval_only`` finds the run again, and a second
  plain start is refused instead of silently starting over. ε is written as a
  short decimal (``0.1``) or else as a fraction with '-' for '/' (``8-255``)."""
  eps = f'{config.eps:g}'
  if len(eps) > 6:
    frac = fractions.Fraction(config.eps).limit_denominator(1000)
    eps = f'{frac.numerator}-{frac.denominator}'
  return os.path.join('runs', f'{config.dataset}_{config.model}_eps{eps}_seed{config.seed}')


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
  flags.DEFINE_float('tol', d.tol, 'Relative residual tolerance of DEQ solves.')
  flags.DEFINE_integer('max_iter', d.max_iter, 'Iteration limit of DEQ solves.')
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


def config_from_flags(defaults: Config, model_defaults: dict | None = None) -> Config:
  try:
    milestones = tuple(float(m) for m in FLAGS.milestones)
  except ValueError:
    raise ValueError(f'--milestones={",".join(FLAGS.milestones)} must be numbers') from None
  try:
    p_epochs = tuple(float(e) for e in FLAGS.p_epochs)
  except ValueError:
    raise ValueError(f'--p_epochs={",".join(FLAGS.p_epochs)} must be numbers') from None
  try:
    tail_strides = tuple(int(s) for s in FLAGS.tail_strides) if FLAGS.tail_strides else None
  except ValueError:
    raise ValueError(f'--tail_strides={",".join(FLAGS.tail_strides)} must be integers') from None
  config = dataclasses.replace(
      defaults, eps=parse_eps(FLAGS.eps), model=FLAGS.model, epochs=FLAGS.epochs,
      batch_size=FLAGS.batch_size, seed=FLAGS.seed, resume=FLAGS.resume,
      eval_only=FLAGS.eval_only, train_examples=FLAGS.train_examples,
      test_examples=FLAGS.test_examples,
      validation_examples=FLAGS.validation_examples,
      eval_examples_per_epoch=FLAGS.eval_examples_per_epoch,
      width=FLAGS.width, depth=FLAGS.depth, dense=FLAGS.dense, batch_norm=FLAGS.batch_norm,
      lr=FLAGS.lr,
      milestones=milestones, eps_start_epochs=FLAGS.eps_start_epochs,
      eps_length_epochs=FLAGS.eps_length_epochs, loss=FLAGS.loss, method=FLAGS.method,
      reg_lambda=FLAGS.reg_lambda, verifier=FLAGS.verifier,
      crown_max_neurons=FLAGS.crown_max_neurons, weight_decay=FLAGS.weight_decay,
      linf_eps_train=FLAGS.linf_eps_train, p_start=FLAGS.p_start, p_end=FLAGS.p_end,
      p_epochs=p_epochs, linf_loss=FLAGS.linf_loss, hinge_mix=FLAGS.hinge_mix,
      linf_kappa=FLAGS.linf_kappa,
      augment_pad=FLAGS.augment_pad, flip=FLAGS.flip,
      deq_scale=FLAGS.deq_scale, deq_stride=FLAGS.deq_stride, tail_strides=tail_strides,
      deq_param_mode=FLAGS.deq_param_mode, deq_bound=FLAGS.deq_bound,
      solver=FLAGS.solver, tol=FLAGS.tol, max_iter=FLAGS.max_iter,
      pgd_steps=FLAGS.pgd_steps, pgd_restarts=FLAGS.pgd_restarts, data_dir=FLAGS.data_dir,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps, progress=FLAGS.progress,
      stop_after_steps=FLAGS.stop_after_steps, train_precision=FLAGS.train_precision)
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
