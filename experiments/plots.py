"""PNG plots of a run's metrics (matplotlib, no display needed), written
through `run_files.save_figure` (local folders and object storage alike)."""
from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from experiments.run_files import save_figure  # pylint: disable=wrong-import-position


def training_curves(records: list[dict], path) -> None:
  """Training losses and ε against the epoch."""
  if not records:
    return
  epochs = [r['epoch'] + 1 for r in records]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for key, label in (('train_loss', 'loss'), ('train_natural_loss', 'natural CE'),
                     ('train_robust_loss', 'robust (IBP) CE')):
    values = [r.get(key) for r in records]
    if any(v is not None for v in values):
      ax1.plot(epochs, [v if v is not None else float('nan') for v in values], label=label)
  ax1.set_xlabel('epoch'); ax1.set_ylabel('training loss'); ax1.set_yscale('log'); ax1.legend()
  ax2.plot(epochs, [r['eps'] for r in records], color='k')
  ax2.set_xlabel('epoch'); ax2.set_ylabel('ε at epoch end (pixel units)')
  fig.tight_layout(); save_figure(fig, path); plt.close(fig)


def errors_per_epoch(records: list[dict], path) -> None:
  """Standard, PGD and certified test error against the epoch."""
  if not records:
    return
  epochs = [r['epoch'] + 1 for r in records]
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (('test_standard_error', 'standard'), ('test_pgd_error', 'PGD'),
                     ('test_certified_error', 'certified')):
    ax.plot(epochs, [r[key] for r in records], marker='o', label=label)
  ax.set_xlabel('epoch'); ax.set_ylabel('test error (%)'); ax.set_ylim(0, 100); ax.legend()
  fig.tight_layout(); save_figure(fig, path); plt.close(fig)
