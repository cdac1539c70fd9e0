"""Reader for the IDX format of the original MNIST / Fashion-MNIST files.

Layout (big-endian): two zero bytes, a type code, the number of dimensions
``ndim``, then ``ndim`` uint32 sizes, then the row-major payload. Files may be
gzip-compressed; compression is detected from the content, not the name,
because Debian recompresses the files and people decompress them by hand.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype('>u1'),
    0x09: np.dtype('>i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}
_GZIP_MAGIC = b'\x1f\x8b'


def _read_bytes(path: str | os.PathLike) -> bytes:
  """Returns the (decompressed) content of ``path``; ValueError if bad gzip."""
  with open(path, 'rb') as f:
    raw = f.read()
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    # Truncated downloads end here; say which file and why in one line.
    raise ValueError(f'{os.fspath(path)}: corrupt gzip stream ({e})') from None


def parse_idx(data: bytes, name: str = '<bytes>') -> np.ndarray:
  """Parses IDX bytes into an array in native byte order.

  Args:
    data: the uncompressed file content.
    name: used in error messages only.

  Returns:
    An array of the stored shape and dtype (uint8 for the image/label files).

  Raises:
    ValueError: bad magic number, unknown type, or a payload whose size does
      not match the header (one-line message).
  """
  if len(data) < 4:
    raise ValueError(f'{name}: not an IDX file (only {len(data)} bytes)')
  zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
  if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
    raise ValueError(f'{name}: not an IDX file (magic {data[:4].hex()})')
  if ndim == 0:
    raise ValueError(f'{name}: IDX header declares 0 dimensions')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f'{name}: truncated IDX header ({len(data)} < {header} bytes)')
  shape = struct.unpack(f'>{ndim}I', data[4:header])
  dtype = _IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
        f'{name}: IDX payload is {len(data) - header} bytes, header {shape} '
        f'of {dtype.name} needs {expected}')
  array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
  # Native byte order, and a writable copy independent of the bytes object.
  return array.astype(dtype.newbyteorder('='))


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (plain or gzip-compressed).

  Args:
    path: file path.

  Returns:
    The stored array, e.g. uint8 ``(N, 28, 28)`` images or uint8 ``(N,)``
    labels, in native byte order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: corrupt file (one-line message naming the file).
  """
  return parse_idx(_read_bytes(path), name=os.fspath(path))
