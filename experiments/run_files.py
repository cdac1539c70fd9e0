"""The files of a run's workdir, through one path type (`etils.epath`).

A workdir is a local folder or a folder on object storage (``gs://bucket/run``,
``s3://...``): epath reaches both, and orbax writes the checkpoints through the
same type. Object stores have no append and no partial rewrite, so
``metrics.jsonl`` is rewritten whole at every epoch (one short line per epoch).
Only process 0 calls the writers here (`experiments.loop`).
"""
from __future__ import annotations

import io
import json
import os

from etils import epath

METRICS = 'metrics.jsonl'
RESULTS = 'results.json'


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an `epath.Path`: a URI as is, a local path made absolute."""
  text = os.fspath(workdir)
  return epath.Path(text if '://' in text else os.path.abspath(text))


def read_metrics(path: epath.Path) -> list[dict]:
  """The records of ``metrics.jsonl`` (none if the file does not exist)."""
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(path: epath.Path, records: list[dict]) -> None:
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))


def truncate_metrics(path: epath.Path, step: int) -> None:
  """Keeps the records written at or before ``step``, the step a run resumes
  from (for exact resume): an epoch's record is written at its last step, so a
  run resumed, or only evaluated, at its end keeps its last, possibly partial,
  epoch."""
  if path.exists():
    write_metrics(path, [r for r in read_metrics(path) if r['step'] <= step])


def append_metrics(path: epath.Path, record: dict) -> None:
  write_metrics(path, read_metrics(path) + [record])


def write_json(path: epath.Path, value) -> None:
  path.write_text(json.dumps(value, indent=1))


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
  """A matplotlib figure as PNG at ``path`` (rendered in memory, written once)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  epath.Path(path).write_bytes(buffer.getvalue())
