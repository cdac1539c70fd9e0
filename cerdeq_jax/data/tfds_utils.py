"""Small helpers for reading tfds data sources into numpy."""
from __future__ import annotations

from typing import Any, Iterator, Sequence


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
