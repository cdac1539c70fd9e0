"""`host_memory.release_freed_heap`: freed heap between live chunks (what a
compiler leaves behind) goes back to the system; nothing live is touched."""
import subprocess
import sys
import textwrap

import pytest

from cerdeq_jax import host_memory

# In a fresh process: a thread (its own malloc arena, as XLA's compiler threads
# have) fills 192 MiB with 64 KiB chunks and frees all but every 16th, so the
# freed chunks lie between live ones where glibc's own trimming never reaches.
_SCRIPT = textwrap.dedent('''
    import sys, threading
    from cerdeq_jax import host_memory

    def rss_mib():
      with open('/proc/self/status') as f:
        return int(dict(line.split(':', 1) for line in f)['VmRSS'].split()[0]) / 1024

    kept = []
    def fill_and_free():
      chunks = [bytearray(b'%c' % (i % 251) * 65536) for i in range(3072)]
      kept.extend(chunks[::16])
    thread = threading.Thread(target=fill_and_free)
    thread.start(); thread.join()
    before = rss_mib()
    released = host_memory.release_freed_heap()
    after = rss_mib()
    intact = all(c[0] == (16 * i) % 251 and len(c) == 65536 for i, c in enumerate(kept))
    print(released, before, after, intact)
''')


def test_release_returns_freed_heap_and_keeps_live_memory():
  if not host_memory.release_freed_heap():
    pytest.skip('not glibc: release_freed_heap is a no-op')
  out = subprocess.run([sys.executable, '-c', _SCRIPT], check=True, capture_output=True,
                       text=True).stdout.split()
  released, before, after, intact = out[0] == 'True', float(out[1]), float(out[2]), out[3]
  assert released and intact == 'True'
  # 180 MiB were freed (12 MiB stay live); most of it must leave the resident set.
  assert before - after > 120, (before, after)
