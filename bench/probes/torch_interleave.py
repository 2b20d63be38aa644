"""Probe: a torch op followed by an optkern kernel, repeated, with optkern on 2 threads and on 1.

    python bench/probes/torch_interleave.py

Measures how optkern's CPU thread pool fares next to torch's OpenMP pool on the same cores: right after a torch
op, torch's threads spin, and a kernel whose worker cannot get a core waits for it unless the caller takes the
worker's part (the pool does since 2026-12-03).  Prints the median time of one (conv, batch norm) pair per case.
"""

import time

import torch

import optkern
import optkern.torch.nn as oknn


def pair_time(conv, bn, x, n=200):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        with torch.no_grad():
            bn(conv(x))
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    torch.set_num_threads(2)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(64, 16, 8, 8)
    ok_bn, torch_bn = oknn.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    for threads in (2, 1):
        optkern.set_num_threads(threads)
        pair_time(conv, ok_bn, x, 20)
        print(f"optkern threads {threads}: conv + optkern BatchNorm2d {pair_time(conv, ok_bn, x) * 1e6:.0f} us, "
              f"conv + torch BatchNorm2d {pair_time(conv, torch_bn, x) * 1e6:.0f} us (median of 200)")


if __name__ == "__main__":
    main()
