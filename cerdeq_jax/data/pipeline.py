"""Host-side input pipeline: normalisation, augmentation, batching, prefetch.

Everything is numpy; the caller turns batches into (sharded) JAX arrays.

Determinism: the example order of an epoch depends only on ``(seed, epoch)``
and the augmentation of a batch only on ``(seed, epoch, step)``, each drawn
from its own `np.random.Generator`. Hence a run resumed at ``start_step`` of
an epoch sees exactly the batches an uninterrupted run would have seen, and
the global batch does not depend on the number of processes.
"""
from __future__ import annotations

import math
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

from cerdeq_jax.data.datasets import Dataset

# Tags that keep the permutation and augmentation random streams apart.
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1
_HOLDOUT_STREAM = 2


def normalize(images: np.ndarray, mean: Sequence[float] | float,
              std: Sequence[float] | float) -> np.ndarray:
  """Maps uint8 pixels to normalised float32 units, ``(x / 255 - mean) / std``.

  Args:
    images: uint8 ``(..., C)`` in 0..255.
    mean: per-channel mean (length C, or a scalar) in [0, 1] pixel units.
    std: per-channel std (length C, or a scalar) in [0, 1] pixel units.

  Returns:
    float32 array of the same shape.
  """
  channels = images.shape[-1]
  mean = np.broadcast_to(np.asarray(mean, np.float64), (channels,))
  std = np.broadcast_to(np.asarray(std, np.float64), (channels,))
  # One multiply-add in float32 with constants folded in float64, tiled over
  # a whole image row: numpy's inner loop over a length-C axis is ~8x slower.
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  shift = (-mean / std).astype(np.float32)
  if images.ndim >= 2:
    width = images.shape[-2]
    rows = images.reshape(-1, width * channels)
    scale, shift = np.tile(scale, width), np.tile(shift, width)
  else:
    rows = images
  out = rows.astype(np.float32)
  out *= scale
  out += shift
  return out.reshape(images.shape)


def _augment_params(rng: np.random.Generator, batch: int, pad: int, flip: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws crop offsets ``dy, dx`` in ``[0, 2 pad]`` and flip flags, each ``(batch,)``.

  The draw order is fixed so that a given generator state gives fixed params.
  """
  if pad < 0:
    raise ValueError(f'pad must be >= 0, got {pad}')
  dy = rng.integers(0, 2 * pad + 1, size=batch)
  dx = rng.integers(0, 2 * pad + 1, size=batch)
  flips = rng.random(batch) < 0.5 if flip else np.zeros(batch, bool)
  return dy, dx, flips


def _gather_crops(images: np.ndarray, index: np.ndarray, dy: np.ndarray,
                  dx: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
  """Crops ``images[index]`` at offsets ``(dy, dx)`` of the edge-padded images.

  Equals ``np.pad(x, pad, mode='edge')[dy:dy+H, dx:dx+W]`` (then flipped
  horizontally where ``flips``) but is one fancy-index gather: edge padding
  is the same as clipping source coordinates into the image, so neither the
  padded copy nor the intermediate ``images[index]`` is materialised.

  Args:
    images: uint8 ``(N, H, W, C)``.
    index: int ``(B,)`` rows of ``images`` to take.
    dy, dx: int ``(B,)`` offsets in ``[0, 2 pad]``.
    flips: bool ``(B,)``.
    pad: padding in pixels.

  Returns:
    uint8 ``(B, H, W, C)``.
  """
  _, h, w, c = images.shape
  rows = np.clip(dy[:, None] + np.arange(h) - pad, 0, h - 1)          # (B, H)
  cols_fwd = dx[:, None] + np.arange(w)                                 # (B, W)
  # Flipping the crop reads its columns right to left.
  cols = np.where(flips[:, None], cols_fwd[:, ::-1], cols_fwd)
  cols = np.clip(cols - pad, 0, w - 1)
  if not images.flags.c_contiguous:
    return images[index[:, None, None], rows[:, :, None], cols[:, None, :]]
  # Same gather, 2x faster: one `take` of whole pixels, each viewed as a single
  # C-byte void item, at flat indices (n H + row) W + col.
  flat = (np.asarray(index, np.int64)[:, None] * h + rows)[:, :, None] * w + cols[:, None, :]
  pixel = np.dtype((np.void, c * images.dtype.itemsize))
  pixels = images.reshape(-1, c).view(pixel).reshape(-1)
  return pixels.take(flat).view(images.dtype).reshape(flat.shape + (c,))


def augment(rng: np.random.Generator, images: np.ndarray, pad: int,
            flip: bool) -> np.ndarray:
  """Random crop after ``pad`` pixels of edge padding, and random h-flip.

  Args:
    rng: source of randomness (advanced by the call).
    images: uint8 ``(B, H, W, C)``.
    pad: edge padding in pixels (0: no crop).
    flip: whether to flip each image horizontally with probability 1/2.

  Returns:
    uint8 ``(B, H, W, C)``.
  """
  batch = images.shape[0]
  dy, dx, flips = _augment_params(rng, batch, pad, flip)
  return _gather_crops(images, np.arange(batch), dy, dx, flips, pad)


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  """Number of (global) batches in one pass over ``num_examples``."""
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if drop_remainder:
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of ``epoch``: int64 ``(num_examples,)``, from (seed, epoch) only."""
  rng = np.random.default_rng([seed, _PERMUTATION_STREAM, epoch])
  return rng.permutation(num_examples)


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int, *,
                  shuffle: bool = True, drop_remainder: bool = True,
                  augment_pad: int = 0, flip: bool = False,
                  process_index: int = 0, process_count: int = 1,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's part of every global batch of one epoch.

  Global batch ``step`` holds positions ``[step B, (step+1) B)`` of the epoch
  order (a permutation drawn from ``(seed, epoch)`` if ``shuffle``, else the
  dataset order); process ``p`` gets the contiguous slice
  ``[p B_local, (p+1) B_local)`` of it, ``B_local = batch_size //
  process_count``. Augmentation params are drawn for the whole global batch
  from ``(seed, epoch, step)`` and sliced the same way.

  With ``drop_remainder=False`` the last global batch is padded to full size
  with zero pixels (before normalisation) and label 0, and ``mask`` marks the
  real examples, so that jitted shapes stay fixed (use it for evaluation).

  Args:
    dataset: the split, uint8 NHWC images.
    batch_size: global batch size B.
    seed, epoch: non-negative ints; all randomness derives from them.
    shuffle: permute the examples each epoch.
    drop_remainder: drop the final partial batch, else pad it.
    augment_pad: random-crop edge padding in pixels (0: no crop).
    flip: random horizontal flips.
    process_index, process_count: this host and the number of hosts.
    start_step: first step to produce (resume inside an epoch).

  Yields:
    ``{'image': float32 (B_local, H, W, C) normalised, 'label': int32
    (B_local,), 'mask': bool (B_local,)}``.
  """
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of '
                     f'process_count {process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if min(seed, epoch, start_step) < 0:
    raise ValueError('seed, epoch and start_step must be >= 0')
  n = dataset.num_examples
  local = batch_size // process_count
  order = epoch_permutation(n, seed, epoch) if shuffle else None
  augmenting = augment_pad > 0 or flip
  for step in range(start_step, steps_per_epoch(n, batch_size, drop_remainder)):
    offset = process_index * local  # this process's slice of the global batch
    start = step * batch_size + offset
    positions = np.arange(start, min(start + local, n))
    index = order[positions] if shuffle else positions
    real = index.shape[0]
    if augmenting:
      rng = np.random.default_rng([seed, _AUGMENT_STREAM, epoch, step])
      params = _augment_params(rng, batch_size, augment_pad, flip)
      dy, dx, flips = (p[offset:offset + real] for p in params)
      pixels = _gather_crops(dataset.images, index, dy, dx, flips, augment_pad)
    else:
      pixels = dataset.images[index]
    labels = dataset.labels[index]
    if real < local:  # only when not drop_remainder: pad to a fixed shape
      pixels = np.concatenate(
          [pixels, np.zeros((local - real,) + pixels.shape[1:], pixels.dtype)])
      labels = np.concatenate([labels, np.zeros(local - real, labels.dtype)])
    mask = np.arange(local) < real
    yield {'image': normalize(pixels, dataset.mean, dataset.std),
           'label': labels.astype(np.int32, copy=False), 'mask': mask}


def subset(dataset: Dataset, n: int | None, seed: int | None = None) -> Dataset:
  """``n`` examples of ``dataset`` (all of it if ``n`` is None or >= its size).

  Default: the first ``n`` (deterministic, identical on every process). The
  files of Fashion-MNIST and CIFAR-10 are class-mixed, so a prefix is roughly
  balanced; Tiny-ImageNet's canonical *train* order is grouped by class, so
  pass ``seed`` there: then ``n`` examples drawn without replacement from
  ``seed`` only (kept in dataset order), roughly class-balanced.
  """
  if n is None or n >= dataset.num_examples:
    return dataset
  if n < 0:
    raise ValueError(f'subset size must be >= 0, got {n}')
  if seed is None:
    return dataset._replace(images=dataset.images[:n], labels=dataset.labels[:n])
  index = np.sort(np.random.default_rng(seed).permutation(dataset.num_examples)[:n])
  return dataset._replace(images=dataset.images[index], labels=dataset.labels[index])


def holdout(dataset: Dataset, n: int, seed: int = 0) -> tuple[Dataset, Dataset]:
  """Splits ``dataset`` into ``(rest, held_out)`` with ``n`` held-out examples.

  The held-out examples are drawn without replacement from ``seed`` only (not
  a run's seed: every run of a study shares one split); both parts keep the
  dataset order. A random draw, not the last ``n``, because Tiny-ImageNet's
  training order is grouped by class.
  """
  if not 0 < n < dataset.num_examples:
    raise ValueError(f'cannot hold out {n} of {dataset.num_examples} examples')
  held = np.zeros(dataset.num_examples, bool)
  held[np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(dataset.num_examples)[:n]] = True
  part = lambda m: dataset._replace(images=dataset.images[m], labels=dataset.labels[m])
  return part(~held), part(held)


class _Failure:
  """Carries an exception from the producer thread to the consumer."""

  def __init__(self, exc: BaseException):
    self.exc = exc


_END = object()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
  """Puts ``item`` unless ``stop`` is set; polls so a full queue cannot hang."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _produce(iterator, q: queue.Queue, stop: threading.Event) -> None:
  # A plain function, not a method: the thread must not keep the
  # `Prefetcher` alive, or `__del__` could never stop an abandoned one.
  try:
    for item in iterator:
      if not _put(q, stop, item):
        return
  except BaseException as e:  # pylint: disable=broad-except
    _put(q, stop, _Failure(e))
    return
  _put(q, stop, _END)


class Prefetcher:
  """Iterates ``iterator`` in a background thread, ``size`` items ahead.

  The thread starts at construction so the first batch is ready early; numpy
  gathers and arithmetic release the GIL, so producing the next batch
  overlaps the (asynchronously dispatched) train step. Exceptions of the
  producer are re-raised by `__next__`. Call `close` (or use ``with``) to stop
  early; an abandoned prefetcher stops when garbage collected.
  """

  def __init__(self, iterator, size: int = 2):
    if size < 1:
      raise ValueError(f'prefetch size must be >= 1, got {size}')
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce, args=(iter(iterator), self._queue, self._stop),
        daemon=True, name='cerdeq-prefetch')
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END or isinstance(item, _Failure):
      self._done = True
      self._thread.join()
      if item is _END:
        raise StopIteration
      raise item.exc
    return item

  def close(self) -> None:
    """Stops the producer thread and waits for it."""
    self._done = True
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    stop = getattr(self, '_stop', None)
    if stop is not None:
      stop.set()


def prefetch(iterator, size: int = 2) -> Prefetcher:
  """Wraps ``iterator`` so that up to ``size`` items are produced ahead."""
  return Prefetcher(iterator, size)
