"""The datasets: Fashion-MNIST, CIFAR-10, Tiny-ImageNet, as in-memory arrays.

Every loader returns a `Dataset` whose ``images`` are uint8 NHWC and whose
``labels`` are int32, plus the per-channel normalisation constants used by
`cerdeq_jax.data.pipeline.normalize`. Missing data raises a one-line
`FileNotFoundError` that says where to put it; nothing is downloaded.

Search order of every loader: the explicit arguments (``manual_dir``,
``data_dir``), then ``$CERDEQ_DATA_DIR`` (the variable name is `DATA_DIR_ENV`),
then a system location.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, NamedTuple

import numpy as np

from cerdeq_jax.data import cifar as cifar_lib
from cerdeq_jax.data import idx as idx_lib
from cerdeq_jax.data import tfds_utils

# By module path: the package attribute `tiny_imagenet` is the loader below.
tiny_lib = importlib.import_module('cerdeq_jax.data.tiny_imagenet')

DATA_DIR_ENV = 'CERDEQ_DATA_DIR'
SPLITS = ('train', 'test')

# Computed once from the 60,000 training images of the Debian package
# (x in [0, 1], population std over all pixels): 0.2860406, 0.3530242.
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Fast-IBP (Shi et al., 2021) constants; see the brief, section 6.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2302, 0.2265, 0.2262)

# Debian's `dataset-fashion-mnist` installs the original IDX files here.
SYSTEM_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
# tfds' default manual-download folder.
TFDS_MANUAL_DIR = os.path.join('~', 'tensorflow_datasets', 'downloads', 'manual')


class Dataset(NamedTuple):
  """One split of a dataset, in memory.

  A NamedTuple, so ``len(ds)`` is the number of fields: use `num_examples`.

  Attributes:
    images: uint8 ``(N, H, W, C)`` pixels in 0..255 (C = 1 for grey).
    labels: int32 ``(N,)`` class ids in ``[0, num_classes)``.
    num_classes: number of classes.
    mean: per-channel mean, length C, in [0, 1] pixel units.
    std: per-channel standard deviation, length C, in [0, 1] pixel units.
    name: dataset name, e.g. 'cifar10'.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)``."""
    return tuple(self.images.shape[1:])


def _make(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
          mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
  """Validates shapes/dtypes/label range and builds the `Dataset`."""
  if images.ndim == 3:  # (N, H, W) grey -> NHWC with C = 1.
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'{name}: expected uint8 (N,H,W,C) images, got '
                     f'{images.dtype} {images.shape}')
  labels = np.asarray(labels).astype(np.int32, copy=False)
  if labels.shape != images.shape[:1]:
    raise ValueError(f'{name}: {images.shape[0]} images but labels of shape {labels.shape}')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{name}: labels outside 0..{num_classes - 1}')
  if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
    raise ValueError(f'{name}: mean/std need {images.shape[-1]} channels')
  return Dataset(images, labels, num_classes, tuple(mean), tuple(std), name)


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')


def _candidates(*dirs: str | os.PathLike | None) -> list[str]:
  """Existing, de-duplicated directories/files among ``dirs`` (None skipped)."""
  seen, out = set(), []
  for d in dirs:
    if d is None:
      continue
    d = os.path.expanduser(os.fspath(d))
    if d not in seen and os.path.exists(d):
      seen.add(d)
      out.append(d)
  return out


def _env_dir(*parts: str) -> str | None:
  root = os.environ.get(DATA_DIR_ENV)
  return os.path.join(root, *parts) if root else None


# ----------------------------------------------------------------- Fashion-MNIST

def _idx_file(folder: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  return None


def fashion_mnist(split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
  """Fashion-MNIST from the original IDX files (60,000 train / 10,000 test).

  Searches ``data_dir`` (and ``data_dir/fashion-mnist``), then
  ``$CERDEQ_DATA_DIR/fashion-mnist``, then `SYSTEM_FASHION_MNIST_DIR`, for
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

  Returns:
    `Dataset` with uint8 ``(N, 28, 28, 1)`` images, 10 classes.
  """
  _check_split(split)
  prefix = 'train' if split == 'train' else 't10k'
  dirs = [os.fspath(data_dir), os.path.join(data_dir, 'fashion-mnist')] if data_dir else []
  dirs += [_env_dir('fashion-mnist'), SYSTEM_FASHION_MNIST_DIR]
  for folder in _candidates(*dirs):
    images_path = _idx_file(folder, f'{prefix}-images-idx3-ubyte')
    labels_path = _idx_file(folder, f'{prefix}-labels-idx1-ubyte')
    if images_path and labels_path:
      images = idx_lib.read_idx(images_path)
      labels = idx_lib.read_idx(labels_path)
      if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f'{images_path}: expected (N,H,W) images and (N,) labels')
      return _make('fashion_mnist', images.astype(np.uint8, copy=False), labels,
                   10, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
  searched = ', '.join(d for d in dirs if d)
  raise FileNotFoundError(
      f'Fashion-MNIST {prefix}-*-ubyte.gz not found (searched {searched}): run '
      f'`apt-get install dataset-fashion-mnist` or pass --data_dir to a folder '
      f'with the IDX files')


# ---------------------------------------------------------------------- CIFAR-10

def _read_tfds_cifar10(data_dir: str | None, split: str
                       ) -> tuple[np.ndarray, np.ndarray] | None:
  """Reads a tfds-prepared ``cifar10`` (ArrayRecord) if one exists, else None.

  Such a copy must have been prepared where TensorFlow is installed, with
  ``file_format='array_record'``. Records are put back in the original order
  via their ``id`` ('train_00042'), matching the binary reader.
  """
  import tensorflow_datasets as tfds
  with tfds_utils.quiet_probe():
    builder = tfds.builder('cifar10', data_dir=data_dir)
    if not builder.is_prepared():
      return None
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # e.g. prepared as TFRecord only.
    raise ValueError(f'cifar10 in {builder.data_dir} cannot be read without '
                     f'TensorFlow (prepare it with file_format=array_record): '
                     f'{type(e).__name__}') from None
  records = sorted(tfds_utils.iter_records(source), key=lambda r: r['id'])
  images = np.stack([r['image'] for r in records]).astype(np.uint8)
  labels = np.array([r['label'] for r in records], np.int32)
  return images, labels


def cifar10(split: str, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> Dataset:
  """CIFAR-10 (50,000 train / 10,000 test, 32x32x3), offline.

  Path used: the binary batches, read directly (see `cerdeq_jax.data.cifar`),
  from ``cifar-10-batches-bin/`` or ``cifar-10-binary.tar.gz`` in the first of
  ``manual_dir``, ``data_dir``, ``data_dir/cifar10``,
  ``data_dir/downloads/manual``, ``$CERDEQ_DATA_DIR/cifar10``,
  ``$CERDEQ_DATA_DIR``, ``$CERDEQ_DATA_DIR/downloads/manual``,
  ``~/tensorflow_datasets/downloads/manual`` that has them. Only if none has,
  a tfds-prepared ``cifar10`` in ArrayRecord format under ``data_dir`` (or
  ``$CERDEQ_DATA_DIR``, or tfds' default) is read with `tfds.data_source`;
  tfds cannot *prepare* cifar10 without TensorFlow.

  Returns:
    `Dataset` with uint8 ``(N, 32, 32, 3)`` images in the files' order.
  """
  _check_split(split)
  data_dir = os.fspath(data_dir) if data_dir else None
  dirs = [manual_dir]
  if data_dir:
    dirs += [data_dir, os.path.join(data_dir, 'cifar10'),
             os.path.join(data_dir, 'downloads', 'manual')]
  dirs += [_env_dir('cifar10'), _env_dir(), _env_dir('downloads', 'manual'), TFDS_MANUAL_DIR]
  arrays = None
  for root in _candidates(*dirs):
    path = cifar_lib.locate(root)
    if path is not None:
      arrays = cifar_lib.read(path, split)
      break
  if arrays is None:
    arrays = _read_tfds_cifar10(data_dir or _env_dir(), split)
  if arrays is None:
    searched = ', '.join(os.fspath(d) for d in dirs if d)
    raise FileNotFoundError(
        f'CIFAR-10 not found (searched {searched}): download '
        f'https://www.cs.toronto.edu/~kriz/{cifar_lib.ARCHIVE_NAME} and put it '
        f'(or its extracted {cifar_lib.FOLDER_NAME}/) in --data_dir or '
        f'${DATA_DIR_ENV}/cifar10')
  return _make('cifar10', *arrays, 10, CIFAR10_MEAN, CIFAR10_STD)


# ----------------------------------------------------------------- Tiny-ImageNet

def tiny_imagenet(split: str, data_dir: str | os.PathLike | None = None,
                  manual_dir: str | os.PathLike | None = None,
                  use_tfds: bool = True) -> Dataset:
  """Tiny-ImageNet-200 (100,000 train / 10,000 'test' = validation, 64x64x3).

  With ``use_tfds`` (default) the project's tfds builder
  `cerdeq_jax.data.tiny_imagenet.TinyImagenet` is prepared once under the tfds
  data dir ``data_dir`` (else ``$CERDEQ_DATA_DIR``, else ~/tensorflow_datasets)
  and read from its ArrayRecord files; this needs no TensorFlow. Without it,
  the JPEGs are decoded directly on every call.

  The source (``tiny-imagenet-200.zip`` or extracted ``tiny-imagenet-200/``)
  is looked for in ``manual_dir``, ``data_dir``, ``data_dir/downloads/manual``,
  ``$CERDEQ_DATA_DIR``, ``$CERDEQ_DATA_DIR/downloads/manual``,
  ``~/tensorflow_datasets/downloads/manual``.

  Returns:
    `Dataset` with uint8 ``(N, 64, 64, 3)`` images, 200 classes (sorted
    wnids), in canonical order (see `tiny_imagenet.list_examples`).
  """
  _check_split(split)
  data_dir = os.fspath(data_dir) if data_dir else None
  tfds_dir = data_dir or _env_dir()
  make = lambda arrays: _make('tiny_imagenet', *arrays, tiny_lib.NUM_CLASSES,
                              TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)
  with tfds_utils.quiet_probe():
    builder = tiny_lib.builder(tfds_dir) if use_tfds else None
    prepared = builder is not None and builder.is_prepared()
  if prepared:
    return make(tiny_lib.read_prepared(builder, split))
  dirs = [manual_dir]
  if data_dir:
    dirs += [data_dir, os.path.join(data_dir, 'downloads', 'manual')]
  dirs += [_env_dir(), _env_dir('downloads', 'manual'), TFDS_MANUAL_DIR]
  for root in _candidates(*dirs):
    path = tiny_lib.locate(root)
    if path is None:
      continue
    if builder is None:
      return make(tiny_lib.read_source(path, split))
    import tensorflow_datasets as tfds
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root))
    return make(tiny_lib.read_prepared(builder, split))
  searched = ', '.join(os.fspath(d) for d in dirs if d)
  raise FileNotFoundError(
      f'Tiny-ImageNet not found (searched {searched}): download '
      f'http://cs231n.stanford.edu/{tiny_lib.ARCHIVE_NAME} and put it (or its '
      f'extracted {tiny_lib.FOLDER_NAME}/) in --data_dir or ${DATA_DIR_ENV}')


# -------------------------------------------------------------------- dispatch

LOADERS: dict[str, Callable[..., Dataset]] = {
    'fashion_mnist': fashion_mnist,
    'cifar10': cifar10,
    'tiny_imagenet': tiny_imagenet,
}


def load(name: str, split: str, **kwargs) -> Dataset:
  """Loads ``split`` of dataset ``name`` (one of `LOADERS`; '-' means '_').

  ``kwargs`` go to the loader (``data_dir``, ``manual_dir``, ``use_tfds``).
  """
  key = name.lower().replace('-', '_')
  if key not in LOADERS:
    raise ValueError(f'unknown dataset {name!r}; valid names: {", ".join(LOADERS)}')
  return LOADERS[key](split, **kwargs)
