#!/usr/bin/env python3
"""How long the disk takes to make a small write durable, the wait every
commit has: 8 kB writes, each followed by fdatasync, into a scratch file in
DIR, for SECONDS. Prints one line with the percentiles, the worst flush and
how many took over 10 ms. A commit waits for a flush like these, so a
stall here is a stall of every claim and completion in flight.

    bench/diskflush.py DIR [SECONDS]
"""
import os
import sys
import tempfile
import time

directory = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
block, span = b"\0" * 8192, 16 << 20  # one WAL page, over a WAL segment's size
fd, path = tempfile.mkstemp(prefix="diskflush-", dir=directory)
try:
    os.ftruncate(fd, span)
    os.fsync(fd)
    flushes, offset, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        os.pwrite(fd, block, offset)
        os.fdatasync(fd)
        flushes.append((time.perf_counter() - start) * 1000)
        offset = (offset + len(block)) % span
finally:
    os.close(fd)
    os.unlink(path)

flushes.sort()
at = lambda q: flushes[min(len(flushes) - 1, int(q * len(flushes)))]
slow = sum(1 for f in flushes if f > 10)
print(f"disk flush (8 kB write + fdatasync in {directory}, {seconds:g} s): {len(flushes)} flushes, "
      f"p50 {at(0.5):.2f} ms, p99 {at(0.99):.2f} ms, p99.9 {at(0.999):.2f} ms, "
      f"max {flushes[-1]:.1f} ms, {slow} over 10 ms")
