"""What the benchmarks share (no flags, so that every benchmark module, and a
test, can import it): a model's compiled train steps on a random
CIFAR-10-shaped batch, and the merging of a results file."""
from __future__ import annotations


def cifar_train_setup(name: str, batch_size: int, image_size: int = 32,
                      precision: str = 'default', **model_kwargs):
  """``(steps, state, global_batch)``: the `training.Steps` of model ``name``
  (`models.create` with ``model_kwargs``) at ε = 8/255 with its layers at
  ``precision`` (`CertifiedTraining.precision`), its replicated initial state
  and a random CIFAR-10-shaped batch, the set-up of every step benchmark."""
  import jax
  import numpy as np
  import optax
  from cerdeq_jax import data, models, training

  mean, std = (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)
  # Random uint8 pixels, normalised as real data is: an input outside the pixel
  # range would lie outside its own (clipped) ε-box.
  pixels = np.random.RandomState(0).randint(0, 256, (batch_size, image_size, image_size, 3))
  x = data.normalize(pixels.astype(np.uint8), mean, std)
  batch = {'image': x, 'label': np.arange(batch_size) % 10, 'mask': np.ones(batch_size, bool)}
  model = models.create(name, 10, image_size=image_size, **model_kwargs)
  cfg = training.CertifiedTraining(eps=8 / 255, mean=mean, std=std,
                                   steps_per_epoch=1, eps_start_epochs=0, eps_length_epochs=1,
                                   parametrization=getattr(model, 'parametrization', None),
                                   precision=precision)
  tx = optax.adam(5e-4)
  mesh = training.make_mesh()
  state = training.replicate(mesh, training.init_state(model, tx, jax.random.PRNGKey(0),
                                                       x[:1], cfg.parametrization))
  return training.Steps(model, tx, cfg, mesh), state, training.global_batch(mesh, batch)


def merged(old: dict, new: dict, measured: dict) -> dict:
  """``old`` (a previous --out file) with the suites of ``new`` replaced, each
  suite stamped with how it was ``measured`` (machine, command, date, load):
  a run of one suite keeps the figures of the others. A file of the older
  layout (one machine/command for all its suites) gets them moved into each."""
  out = {k: v for k, v in old.items() if k not in ('machine', 'command')}
  for suite, figures in out.items():
    if isinstance(figures, dict) and 'measured' not in figures:
      figures['measured'] = {k: old[k] for k in ('machine', 'command') if k in old}
  out.update({suite: {**figures, 'measured': measured} for suite, figures in new.items()})
  return out
