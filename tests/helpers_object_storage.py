"""An offline stand-in for Google Cloud Storage, for ``--workdir=gs://bucket/run``.

    python tests/helpers_object_storage.py ROOT [flags of experiments.fashion_mnist]

runs ``experiments.fashion_mnist`` with ``gs://bucket/key`` served from the
local file ``ROOT/bucket/key``, for the two clients a run has:

* `etils.epath` (our metrics, results, plots and workdir probe; orbax's
  directories, metadata and commit markers): epath reaches ``gs://`` through
  fsspec (without TensorFlow), and fsspec's filesystem for ``gs``/``gcs``
  becomes `LocalGCS` here instead of gcsfs;
* TensorStore (orbax's array data): orbax normalises the path of every
  TensorStore spec (`tensorstore_utils._normalize_path`); here that maps
  ``gs://`` to the same folder, so orbax picks TensorStore's ``file`` driver
  instead of its ``gcs`` one;
* google-cloud-storage, which orbax asks whether a bucket has a hierarchical
  namespace: here it is a flat bucket (GCS's default).

Everything else, orbax's GCS code paths included, runs as for GCS. Code that
used ``os``/``open`` on a ``gs://`` path would write below the current folder
(``gs:/bucket/...``) or fail, which the tests check.
"""
from __future__ import annotations

import os
import runpy
import sys

from fsspec.implementations.local import LocalFileSystem

ROOT = os.path.abspath(sys.argv[1]) if __name__ == '__main__' else None
_SCHEMES = ('gs://', 'gcs://')


class LocalGCS(LocalFileSystem):
  """``gs://bucket/key`` <-> ``ROOT/bucket/key``; names come back as gcsfs
  gives them (``bucket/key``, no scheme)."""
  protocol = ('gs', 'gcs')
  root_marker = ''

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs' argument, epath passes it
    del args, finalize_on_close, kwargs
    super().__init__(auto_mkdir=True)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path) if not isinstance(path, str) else path
    for scheme in _SCHEMES:
      if path.startswith(scheme):
        return os.path.join(ROOT, path[len(scheme):]).rstrip('/')
    return super()._strip_protocol(path)

  @staticmethod
  def _key(local: str) -> str:
    return os.path.relpath(local, ROOT) if local.startswith(ROOT) else local

  def glob(self, path, **kwargs):
    return [self._key(p) for p in super().glob(path, **kwargs)]

  def walk(self, path, *args, **kwargs):
    for top, dirs, files in super().walk(path, *args, **kwargs):
      yield self._key(top), dirs, files


def install():
  import fsspec
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils
  for scheme in ('gs', 'gcs'):
    fsspec.register_implementation(scheme, LocalGCS, clobber=True)
  normalize = tensorstore_utils._normalize_path  # pylint: disable=protected-access

  def local(path: str) -> str:
    path = os.fspath(path)
    for scheme in _SCHEMES:
      if path.startswith(scheme):
        return os.path.join(ROOT, path[len(scheme):])
    return normalize(path)

  tensorstore_utils._normalize_path = local  # pylint: disable=protected-access
  gcs_utils.is_hierarchical_namespace_enabled = lambda path: False


if __name__ == '__main__':
  install()
  sys.argv = [sys.argv[0]] + sys.argv[2:]
  runpy.run_module('experiments.fashion_mnist', run_name='__main__', alter_sys=True)
