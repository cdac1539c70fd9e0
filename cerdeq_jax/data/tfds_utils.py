"""Small helpers for reading tfds data sources into numpy."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from absl import logging


def iter_records(source: Sequence[Any], chunk: int = 4096) -> Iterator[Any]:
  """Yields every record of a random-access ``source`` in index order.

  Uses the batched ``__getitems__`` of tfds' ArrayRecord data sources when
  there is one (far fewer Python round trips than ``source[i]``), else plain
  indexing (e.g. a list, or a mock).
  """
  n = len(source)
  getitems = getattr(source, '__getitems__', None)
  for start in range(0, n, chunk):
    keys = range(start, min(n, start + chunk))
    if getitems is not None:
      yield from getitems(keys)
    else:
      yield from (source[i] for i in keys)


@contextlib.contextmanager
def quiet_probe():
  """Silences absl warnings (tfds logs through absl) while probing for a
  prepared dataset: an absent one makes tfds warn about empty version
  folders, which would stand in front of the one-line 'not found' error."""
  previous = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(previous)
