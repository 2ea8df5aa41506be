"""A worker's freed large arrays leave its resident memory, whichever thread freed them."""

from __future__ import annotations

import subprocess
import sys

# In a fresh interpreter: two threads allocate and free 8 MB arrays (the size of a pooled volume or
# a slab), after a 40 MB array freed has raised glibc's dynamic mmap threshold as a job's volumes do.
RETAINED = """
import sys, threading
import numpy as np
from vesalius.inference.memory import map_large_blocks

def resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))

assert map_large_blocks() is True
before = resident_mb()
big = np.ones(40 << 20, np.uint8)
del big

def work():
    for _ in range(5):
        blocks = [np.ones(8 << 20, np.uint8) for _ in range(10)]
        del blocks

threads = [threading.Thread(target=work) for _ in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(resident_mb() - before)
"""


def test_freed_large_arrays_are_returned_to_the_os_from_every_thread() -> None:
    out = subprocess.run([sys.executable, "-c", RETAINED], capture_output=True, text=True, check=True)
    retained_mb = int(out.stdout)
    assert retained_mb < 20, f"{retained_mb} MB of freed arrays stayed resident (80 MB were live at once)"
