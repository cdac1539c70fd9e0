"""Handing the heap that XLA's compiler freed back to the operating system.

Compiling the CIFAR-10 CerDEQ's certified train step on the CPU leaves about
350 MB of freed compiler memory (LLVM's and XLA's working sets, spread over the
compiler threads' malloc arenas) that glibc keeps resident: freed chunks lie
between live ones, so its automatic trimming at the top of each heap never
reaches them. That is a third of the step's process before the first step
(docs/performance.md). `release_freed_heap` returns those pages (glibc's
``malloc_trim``); `cerdeq_jax.training.Steps` calls it after each compilation.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
  try:
    trim = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6').malloc_trim
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
    return None
  trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
  return trim


def release_freed_heap() -> bool:
  """Returns the free pages of every malloc arena to the operating system
  (what is still allocated stays; a few milliseconds). Returns whether the C
  library offers it (glibc); elsewhere a no-op that returns False."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
