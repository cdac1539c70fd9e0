"""Tiny-ImageNet (200 classes, 64x64x3): a tfds builder and a direct reader.

Source: the manually downloaded ``tiny-imagenet-200.zip`` (read in place, not
extracted) or its extracted ``tiny-imagenet-200/`` folder:

* train: ``train/<wnid>/images/*.JPEG``, 500 per class (100,000);
* validation: ``val/images/*.JPEG`` with labels in ``val/val_annotations.txt``
  (10,000). The official test set has no labels, so the project's 'test'
  split is this validation set, as in the IBP literature.

Class ids: the wnids of ``wnids.txt`` *sorted*, i.e. the order of
``torchvision.datasets.ImageFolder`` over ``train/``, so label ids match the
PyTorch reference code. Some JPEGs are greyscale; they are converted to RGB.

Two ways to read it:

* `TinyImagenet` (tfds name ``tiny_imagenet``) decodes the JPEGs once and
  writes ArrayRecord files; later runs read those (fast). Preparation works
  *without TensorFlow* because the image is stored as a raw uint8 ``Tensor``
  feature rather than a tfds ``Image`` (whose PNG encoding calls
  TensorFlow). This is the default path of `cerdeq_jax.data.tiny_imagenet`.
* `read_source` decodes the JPEGs directly every time (no tfds, no cache);
  ``use_tfds=False`` in the loader, and the fallback if tfds is unusable.

The tfds builder class is created lazily (module ``__getattr__``) so that
importing this module does not import tensorflow_datasets.
"""
from __future__ import annotations

import io
import os
import zipfile
from typing import Iterator

import numpy as np

from cerdeq_jax.data import tfds_utils

ARCHIVE_NAME = 'tiny-imagenet-200.zip'
FOLDER_NAME = 'tiny-imagenet-200'
IMAGE_SHAPE = (64, 64, 3)
NUM_CLASSES = 200
# Our split name -> the folder split it comes from (and the tfds split name).
SPLITS = {'train': 'train', 'test': 'validation'}

MANUAL_DOWNLOAD_INSTRUCTIONS = (
    f'Download http://cs231n.stanford.edu/{ARCHIVE_NAME} and put the zip (or '
    f'its extracted {FOLDER_NAME}/ folder) in the manual directory.')


class Source:
  """Read access to the Tiny-ImageNet files in a folder or in the zip.

  Paths are relative to the ``tiny-imagenet-200`` root, with '/' separators.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._zip = None
    self._prefix = ''
    if os.path.isfile(self.path):
      try:
        self._zip = zipfile.ZipFile(self.path)
      except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f'{self.path}: corrupt Tiny-ImageNet zip ({e})') from None
      names = self._zip.namelist()
      wnids = [n for n in names if n.endswith('wnids.txt')]
      if not wnids:
        raise ValueError(f'{self.path}: zip has no wnids.txt; not Tiny-ImageNet')
      self._prefix = min(wnids, key=len)[:-len('wnids.txt')]
      self._names = names

  def read(self, rel: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(self._prefix + rel)
    with open(os.path.join(self.path, *rel.split('/')), 'rb') as f:
      return f.read()

  def list_dir(self, rel: str) -> list[str]:
    """Sorted file names directly inside the folder ``rel``."""
    if self._zip is None:
      folder = os.path.join(self.path, *rel.split('/'))
      return sorted(n for n in os.listdir(folder)
                    if os.path.isfile(os.path.join(folder, n)))
    start = self._prefix + rel.rstrip('/') + '/'
    return sorted(n[len(start):] for n in self._names
                  if n.startswith(start) and '/' not in n[len(start):]
                  and n != start)


def locate(root: str | os.PathLike) -> str | None:
  """Finds Tiny-ImageNet under ``root``: the extracted folder or the zip.

  Accepts ``root`` being the ``tiny-imagenet-200`` folder itself, a folder
  containing it, or a folder containing ``tiny-imagenet-200.zip`` (the
  extracted folder wins). Returns that path or None.
  """
  root = os.fspath(root)
  for folder in (root, os.path.join(root, FOLDER_NAME)):
    if os.path.isfile(os.path.join(folder, 'wnids.txt')):
      return folder
  archive = os.path.join(root, ARCHIVE_NAME)
  if os.path.isfile(archive):
    return archive
  if os.path.isfile(root) and root.endswith('.zip'):
    return root
  return None


def class_names(source: Source) -> list[str]:
  """The 200 wnids, sorted: index = class id."""
  wnids = source.read('wnids.txt').decode().split()
  if len(set(wnids)) != len(wnids) or not wnids:
    raise ValueError(f'{source.path}: wnids.txt is empty or has duplicates')
  return sorted(wnids)


def list_examples(source: Source, split: str) -> list[tuple[str, int]]:
  """``(relative path, class id)`` of every image of ``split``, canonical order.

  Train: classes in id order, files sorted by name. Test: the order of
  ``val_annotations.txt``.
  """
  if split not in SPLITS:
    raise ValueError(f"Tiny-ImageNet split must be 'train' or 'test', got {split!r}")
  names = class_names(source)
  ids = {w: i for i, w in enumerate(names)}
  if split == 'train':
    return [(f'train/{w}/images/{f}', ids[w]) for w in names
            for f in source.list_dir(f'train/{w}/images') if f.upper().endswith('.JPEG')]
  examples = []
  for line in source.read('val/val_annotations.txt').decode().splitlines():
    fields = line.split('\t')
    if len(fields) < 2:
      continue
    if fields[1] not in ids:
      raise ValueError(f'{source.path}: val annotation class {fields[1]!r} not in wnids.txt')
    examples.append((f'val/images/{fields[0]}', ids[fields[1]]))
  return examples


def decode_jpeg(data: bytes, name: str = '<jpeg>') -> np.ndarray:
  """Decodes one image to uint8 ``(64, 64, 3)`` RGB (greyscale is expanded)."""
  from PIL import Image  # pillow comes with matplotlib; imported on use.
  with Image.open(io.BytesIO(data)) as img:
    array = np.asarray(img.convert('RGB'))
  if array.shape != IMAGE_SHAPE:
    raise ValueError(f'{name}: image shape {array.shape}, expected {IMAGE_SHAPE}')
  return array


def iter_examples(source: Source, split: str) -> Iterator[tuple[int, str, np.ndarray, int]]:
  """Yields ``(index, relative path, image, label)`` in canonical order."""
  for index, (rel, label) in enumerate(list_examples(source, split)):
    yield index, rel, decode_jpeg(source.read(rel), rel), label


def read_source(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Directly decodes ``split`` from the folder or zip at ``path``.

  Returns:
    ``(images, labels)``: uint8 ``(N, 64, 64, 3)`` and int32 ``(N,)``.
  """
  source = Source(path)
  examples = list_examples(source, split)
  images = np.empty((len(examples),) + IMAGE_SHAPE, np.uint8)
  labels = np.empty((len(examples),), np.int32)
  for i, (rel, label) in enumerate(examples):
    images[i] = decode_jpeg(source.read(rel), rel)
    labels[i] = label
  return images, labels


def read_prepared(builder, split: str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Reads a prepared `TinyImagenet` split into memory in canonical order.

  tfds shuffles records when writing; the stored ``index`` restores the order
  of `list_examples`, so both reading paths agree example by example.
  """
  source = builder.as_data_source(split=SPLITS[split])
  n = len(source)
  images = np.empty((n,) + IMAGE_SHAPE, np.uint8)
  labels = np.empty((n,), np.int32)
  index = np.empty((n,), np.int64)
  for i, record in enumerate(tfds_utils.iter_records(source, chunk)):
    images[i], labels[i], index[i] = record['image'], record['label'], record['index']
  order = np.argsort(index, kind='stable')
  return images[order], labels[order]


def _make_builder_class():
  """Defines (and thereby registers with tfds) the `TinyImagenet` builder."""
  import tensorflow_datasets as tfds

  class TinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet-200 from the manual download; splits train/validation."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Images as raw uint8 tensors (prepares without TF).'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description='Tiny-ImageNet-200: 200 classes of 64x64 RGB images.',
          features=tfds.features.FeaturesDict({
              # Tensor, not Image: tfds' Image encoder needs TensorFlow.
              # Uncompressed: zlib saves little on photos (~10%) and its
              # decode was a third of the read time.
              'image': tfds.features.Tensor(
                  shape=IMAGE_SHAPE, dtype=np.uint8,
                  encoding=tfds.features.Encoding.NONE),
              'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
              'id': tfds.features.Text(),
              # Position in the canonical order (tfds shuffles on write).
              'index': tfds.features.Scalar(dtype=np.int64),
          }),
          supervised_keys=('image', 'label'),
          homepage='http://cs231n.stanford.edu/tiny-imagenet-200.zip',
      )

    def _split_generators(self, dl_manager):
      path = locate(dl_manager.manual_dir)
      if path is None:
        raise FileNotFoundError(
            f'Tiny-ImageNet not found in {dl_manager.manual_dir}. '
            + MANUAL_DOWNLOAD_INSTRUCTIONS)
      return {tfds_split: self._generate_examples(path, split)
              for split, tfds_split in SPLITS.items()}

    def _generate_examples(self, path, split):
      source = Source(path)
      for index, rel, image, label in iter_examples(source, split):
        yield index, {'image': image, 'label': label, 'id': rel, 'index': index}

  # Present it as the module-level class it stands for (repr, pickling).
  TinyImagenet.__module__ = __name__
  TinyImagenet.__qualname__ = 'TinyImagenet'
  return TinyImagenet


_BUILDER_CLASS = None


def __getattr__(name: str):
  # PEP 562: `TinyImagenet` is built on first access, importing tfds only then.
  global _BUILDER_CLASS
  if name == 'TinyImagenet':
    if _BUILDER_CLASS is None:
      _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def builder(data_dir: str | None = None):
  """A `TinyImagenet` builder writing/reading ArrayRecord under ``data_dir``.

  ``data_dir`` is a tfds data directory (None: tfds' default,
  ~/tensorflow_datasets). Call ``download_and_prepare(download_config=
  tfds.download.DownloadConfig(manual_dir=...))`` if ``not is_prepared()``.
  """
  return __getattr__('TinyImagenet')(data_dir=data_dir, file_format='array_record')
