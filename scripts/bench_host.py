#!/usr/bin/env python3
"""What xlsr_jax.malloc's malloc setting is worth to a jitted XLA:CPU step: page faults and time per call.

    python scripts/bench_host.py               # 4096 x 4096 float32 (a 64 MiB result), 32 calls
    python scripts/bench_host.py --size 8192   # a 256 MiB result

Runs the same probe in two fresh processes, the setting on (`XLSR_JAX_SYSTEM_MALLOC=0`) and off (`=1`):
a jitted `x * 2` whose result is freed before the next call, as a train step frees its temporaries.
Prints, side by side, the median page faults per call (in blocks of the result's size) and the median
milliseconds per call over the second half of the calls. The figures depend on timing (when XLA's
threads free a buffer against when the next call allocates), so they are printed, never asserted; the
deterministic check of the mechanism is tests/test_malloc.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import resource, statistics, sys, time
from xlsr_jax.malloc import retain_freed_memory
applied = retain_freed_memory()
import jax, jax.numpy as jnp
n, calls = int(sys.argv[1]), int(sys.argv[2])
step = jax.jit(lambda x: x * 2.0)
x = jnp.ones((n, n), jnp.float32)
faults, times = [], []
for _ in range(calls):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    y = step(x)
    y.block_until_ready()
    del y
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
pages = n * n * 4 // resource.getpagesize()
half = calls // 2
print(applied, statistics.median(faults[half:]) / pages, 1e3 * statistics.median(times[half:]))
"""


def probe(opt_out: str, size: int, calls: int) -> tuple[str, float, float]:
    env = {**os.environ, "XLSR_JAX_SYSTEM_MALLOC": opt_out, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", PROBE, str(size), str(calls)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], float(out[1]), float(out[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="the square float32 array's side")
    parser.add_argument("--calls", type=int, default=32)
    args = parser.parse_args(argv)
    rows = {"setting on": probe("0", args.size, args.calls), "glibc defaults": probe("1", args.size, args.calls)}
    print(f"{'':16} {'applied':>8} {'blocks faulted/call':>20} {'ms/call':>8}")
    for name, (applied, blocks, ms) in rows.items():
        print(f"{name:16} {applied:>8} {blocks:20.2f} {ms:8.1f}")
    on, off = rows["setting on"], rows["glibc defaults"]
    print(f"time_ratio_off_over_on: {off[2] / on[2]:.2f}")


if __name__ == "__main__":
    main()
