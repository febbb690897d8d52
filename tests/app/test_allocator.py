"""The app's malloc settings: a large block allocated in a worker thread comes from the one shared heap."""
from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import sys, threading
    from explorer.app.allocator import share_one_heap

    applied = share_one_heap() if sys.argv[1] == "shared" else None

    def heap_bytes():
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                return end - start
        return 0

    before = heap_bytes()
    kept = []
    worker = threading.Thread(target=lambda: kept.append(bytearray(256 << 20)))  # 256 MB, as a trace's pass allocates
    worker.start()
    worker.join()
    print(applied, (heap_bytes() - before) >> 20)
""")


def heap_growth(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_a_worker_threads_large_block_comes_from_the_shared_heap():
    applied, grown = heap_growth("shared")
    assert applied == "True"
    assert grown >= 256, f"the main heap grew by {grown} MB: the block came from elsewhere (a thread arena or mmap)"
    # Without the settings the same block is a fresh mapping of its own and the main heap does not grow.
    applied, grown = heap_growth("default")
    assert applied == "None" and grown < 256
