"""The configuration of a run: `Config`, its validation and its default workdir.

Plain data and checks, no flags and no JAX: `experiments.common` turns absl
flags into a `Config`; the loop, the study and the benchmarks read it.
"""
from __future__ import annotations

import dataclasses
import fractions
import math
import os

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
  # Anderson's history: 3 converges in as few iterations as 5 on trained layers
  # and holds 40 % less (docs/performance.md).
  anderson_memory: int = 3
  tol: float = 1e-4
  max_iter: int = 50
  # The DEQ solves of evaluation: the sound widening of the bounds grows with
  # the residual, so a certificate wants a tighter tolerance than training.
  eval_tol: float = 1e-5
  eval_max_iter: int = 100
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

  @classmethod
  def from_json(cls, fields: dict) -> 'Config':
    """The inverse of `to_json` (unknown keys, e.g. of a newer version, ignored;
    fields added since, at the value that reproduces the run: `ADDED_FIELDS`)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in {**ADDED_FIELDS, **fields}.items() if k in cls.__dataclass_fields__})

  def identity(self) -> dict:
    """What a checkpoint must have been saved under to be resumed by this
    config: every field but run control and added fields at their default."""
    return {k: v for k, v in self.to_json().items()
            if k not in RUN_CONTROL and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


RUN_CONTROL = ('checkpoint_every_steps', 'keep_checkpoints', 'eval_only', 'resume', 'progress',
               'stop_after_steps', 'data_dir', 'epochs', 'eval_examples_per_epoch',
               'pgd_steps', 'pgd_restarts', 'test_examples', 'verifier', 'crown_max_neurons',
               'train_precision', 'eval_tol', 'eval_max_iter')
#: Fields added after runs had started, with their default (= the behaviour
#: before them): left out of a checkpoint's identity while at it, so that
#: those runs still resume.
ADDED_FIELDS = {'deq_param_mode': 'project', 'deq_bound': 'spectral', 'method': 'ibp',
                'weight_decay': 5e-3, 'linf_eps_train': None, 'p_start': 8.0, 'p_end': 1000.0,
                'p_epochs': [50.0, 350.0], 'linf_loss': 'hinge', 'hinge_mix': 1.0,
                'linf_kappa': 1.0, 'anderson_memory': 5}


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
  for name in ('batch_size', 'anderson_memory', 'max_iter', 'eval_max_iter',
               'checkpoint_every_steps', 'keep_checkpoints'):
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
  for name in ('tol', 'eval_tol'):
    if not 0 < getattr(config, name) < 1:
      raise ValueError(f'--{name} must lie in (0, 1), got {getattr(config, name)}')
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
