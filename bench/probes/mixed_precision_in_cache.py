"""In-cache cost per element of one Adam step in each 16-bit storage mode, one thread (NumPy arrays; the
functional layer).  Usage: PYTHONPATH=python python bench/probes/mixed_precision_in_cache.py [n=131072]

Shows whether a mode is bound by arithmetic: with n small enough to stay in cache, the time per element is the
kernel's compute cost (the call's fixed cost, ~10 us, is included; it is < 0.1 ns per element at n = 131072)."""
import sys
import time

import ml_dtypes
import numpy as np
import optkern

optkern.set_num_threads(1)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
bf = ml_dtypes.bfloat16
r = np.random.default_rng(0)
p = r.standard_normal(n).astype(bf); g = r.standard_normal(n).astype(bf)
m = np.zeros(n, np.float32); v = r.random(n).astype(np.float32); mb = np.zeros(n, bf); vb = r.random(n).astype(bf)
p32 = r.standard_normal(n).astype(np.float32); g32 = r.standard_normal(n).astype(np.float32); master = p.astype(np.float32); res = np.zeros(n, np.int16); cp = np.zeros(n, bf)
cases = {
 "f32": lambda: optkern.adam_step([p32], [g32], [m], [v], step=10),
 "bf16 f32state": lambda: optkern.adam_step([p], [g], [m], [v], step=10),
 "bf16 bf16state": lambda: optkern.adam_step([p], [g], [mb], [vb], step=10),
 "fp32 master": lambda: optkern.adam_step([p], [g], [m], [v], step=10, masters=[master], master_weights="fp32"),
 "split": lambda: optkern.adam_step([p], [g], [m], [v], step=10, masters=[res], master_weights="split"),
 "sr": lambda: optkern.adam_step([p], [g], [m], [v], step=10, stochastic_rounding=True, seed=3),
 "offload": lambda: optkern.adam_step([p32], [g], [m], [v], step=10, param_copies=[cp]),
}
for k, f in cases.items():
    best = 1e9
    for _ in range(7):
        s = time.perf_counter()
        for _ in range(100): f()
        best = min(best, (time.perf_counter() - s) / 100)
    print(f"{k:16s} {best/n*1e9:.3f} ns/el  {best*1e6:.1f} us")
