"""Reader for the CIFAR-10 *binary* distribution (``cifar-10-binary.tar.gz``).

Each batch file holds records of 1 label byte followed by 3072 pixel bytes in
CHW order (1024 red, 1024 green, 1024 blue, each row-major 32x32). This is
read directly, without TensorFlow, from either the extracted
``cifar-10-batches-bin/`` folder or the tar.gz itself.

Why not only tfds: tfds 4.9.10 *reads* a prepared ``cifar10`` without
TensorFlow, but *preparing* it calls ``tf.io.gfile`` and TF's PNG encoder, so
an offline machine without TensorFlow cannot build it.
"""
from __future__ import annotations

import os
import tarfile
from typing import Sequence

import numpy as np

ARCHIVE_NAME = 'cifar-10-binary.tar.gz'
FOLDER_NAME = 'cifar-10-batches-bin'
TRAIN_FILES = tuple(f'data_batch_{i}.bin' for i in range(1, 6))
TEST_FILES = ('test_batch.bin',)
_SIDE = 32
_RECORD = 1 + 3 * _SIDE * _SIDE  # 3073 bytes


def batch_files(split: str) -> tuple[str, ...]:
  """Names of the batch files that make up ``split`` ('train' or 'test')."""
  if split == 'train':
    return TRAIN_FILES
  if split == 'test':
    return TEST_FILES
  raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")


def parse_batches(chunks: Sequence[bytes], name: str = 'cifar10'
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Parses concatenated binary batch files.

  Args:
    chunks: raw content of each batch file, in order.
    name: used in error messages only.

  Returns:
    ``(images, labels)``: uint8 ``(N, 32, 32, 3)`` (HWC) and int32 ``(N,)``.
  """
  for chunk in chunks:
    if len(chunk) % _RECORD:
      raise ValueError(
          f'{name}: CIFAR-10 batch of {len(chunk)} bytes is not a multiple of '
          f'{_RECORD}-byte records (corrupt or truncated file)')
  records = np.frombuffer(b''.join(chunks), np.uint8).reshape(-1, _RECORD)
  labels = records[:, 0].astype(np.int32)
  if labels.size and labels.max() > 9:
    raise ValueError(f'{name}: CIFAR-10 label {labels.max()} out of range 0..9')
  # CHW -> HWC; a contiguous copy so later crops/gathers are cache friendly.
  images = np.ascontiguousarray(
      records[:, 1:].reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))
  return images, labels


def locate(root: str | os.PathLike) -> str | None:
  """Finds the CIFAR-10 binary data under ``root``.

  Accepts ``root`` being the extracted ``cifar-10-batches-bin`` folder, a
  folder containing it, or a folder containing ``cifar-10-binary.tar.gz``
  (the extracted folder wins: no decompression). Returns the folder or
  archive path, or None.
  """
  root = os.fspath(root)
  for folder in (root, os.path.join(root, FOLDER_NAME)):
    if all(os.path.isfile(os.path.join(folder, f)) for f in TRAIN_FILES + TEST_FILES):
      return folder
  archive = os.path.join(root, ARCHIVE_NAME)
  if os.path.isfile(archive):
    return archive
  if os.path.isfile(root) and root.endswith(('.tar.gz', '.tgz', '.tar')):
    return root
  return None


def read_folder(folder: str | os.PathLike, split: str
                ) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``split`` from an extracted ``cifar-10-batches-bin`` folder."""
  chunks = []
  for fname in batch_files(split):
    with open(os.path.join(folder, fname), 'rb') as f:
      chunks.append(f.read())
  return parse_batches(chunks, name=os.fspath(folder))


def read_archive(archive: str | os.PathLike, split: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``split`` straight from ``cifar-10-binary.tar.gz`` (no extraction)."""
  wanted = batch_files(split)
  found: dict[str, bytes] = {}
  try:
    with tarfile.open(archive, 'r:*') as tar:
      # Stream through members: a gzip tar cannot seek cheaply.
      for member in tar:
        base = os.path.basename(member.name)
        if member.isfile() and base in wanted:
          found[base] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'{os.fspath(archive)}: corrupt CIFAR-10 archive ({e})') from None
  missing = [f for f in wanted if f not in found]
  if missing:
    raise ValueError(f'{os.fspath(archive)}: archive lacks {", ".join(missing)}')
  return parse_batches([found[f] for f in wanted], name=os.fspath(archive))


def read(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``split`` from a path returned by `locate` (folder or archive)."""
  if os.path.isdir(path):
    return read_folder(path, split)
  return read_archive(path, split)
