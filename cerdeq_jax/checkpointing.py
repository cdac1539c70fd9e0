"""Orbax checkpoints of a `TrainState` that survive interruption.

* Saves are atomic (orbax writes to a temporary folder and renames it when
  complete); unfinished temporary folders are removed on start, so a partially
  written checkpoint is never listed.
* A finished checkpoint that fails to restore (corrupted on disk) is skipped
  with a warning and the previous one is tried.
* The run's configuration is saved with every checkpoint; resuming under a
  different configuration is refused (`IncompatibleCheckpoint`).
* Keeps the latest ``keep`` checkpoints and the best one by a metric.
* The directory may be local or on object storage (``gs://...``): orbax
  reaches it through `etils.epath`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import flax
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from cerdeq_jax.training import TrainState

log = logging.getLogger(__name__)


class IncompatibleCheckpoint(ValueError):
  """The checkpoint was written by a run with another configuration."""


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in keys
          if saved.get(k) != current.get(k)]


def _as_path(directory) -> epath.Path:
  """A URI as is (``os.path.abspath`` would turn ``gs://b`` into ``$PWD/gs:/b``),
  a local path made absolute (orbax wants absolute paths)."""
  text = os.fspath(directory)
  return epath.Path(text if '://' in text else os.path.abspath(text))


class Checkpointer:
  """Saves and restores `TrainState`s under ``directory``.

  Args:
    directory: a local path (absolute or relative) or a URI such as
      ``gs://bucket/run/checkpoints`` (created if missing).
    config: JSON-serialisable dict identifying the run; compared on restore.
    keep: number of latest checkpoints kept.
    best_metric: metric name (lower is better) whose best checkpoint is kept.
  """

  def __init__(self, directory: str | os.PathLike, config: Mapping[str, Any], keep: int = 2,
               best_metric: str = 'certified_error'):
    self.config = dict(config)
    self.best_metric = best_metric
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(keep),
        policies.BestN(get_metric_fn=lambda m: -m[best_metric], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(_as_path(directory), options=options,
                                         item_names=('state', 'config'))
    # Orbax removes unfinished temporary folders in a background thread; wait
    # for it, or a run that stops right away (e.g. --eval_only without a
    # checkpoint) can exit under it and print that thread's traceback.
    getattr(self.manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()

  def save(self, state: TrainState, step: int, metrics: Mapping[str, float] | None = None):
    metrics = ({self.best_metric: float(metrics[self.best_metric])}
               if metrics and self.best_metric in metrics else None)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        config=ocp.args.JsonSave(self.config)), metrics=metrics, force=True)
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """JAX's multi-process preemption sync point (False with one process):
    True at the same ``step`` on every process once any got a SIGTERM. Call
    it at every step on every process."""
    return self.manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, template: TrainState) -> TrainState | None:
    """Restores the newest readable checkpoint into the structure, shapes and
    shardings of ``template``; None when there is none.

    Raises:
      IncompatibleCheckpoint: saved under another configuration.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      flax.serialization.to_state_dict(template))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved_config = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint %d unreadable (%s); trying an older one', step, e)
        continue
      diff = _config_diff(saved_config, self.config)
      if diff:
        raise IncompatibleCheckpoint(
            f'checkpoint at step {step} in {self.manager.directory} was written with another '
            f'configuration ({"; ".join(diff)}); use a new --workdir or the same flags.')
      try:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
      except Exception as e:  # pylint: disable=broad-except
        log.warning('checkpoint %d unreadable (%s); trying an older one', step, e)
        continue
      return flax.serialization.from_state_dict(template, restored)
    return None

  def close(self):
    self.manager.close()
