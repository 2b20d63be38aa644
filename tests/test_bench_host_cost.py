"""The host-cost benchmark (optkern.bench.host_cost) on the CPU, quick: its timer, its summary and verdict, that
every implementation it times really steps, and that ``python -m optkern.bench.host_cost --quick`` writes its
table.  On a GPU bench/gpu_check.sh runs the same code with CuPy arrays and CUDA tensors."""

import json

import numpy as np
import optkern
import pytest
from conftest import AVAILABLE_ISAS
from optkern.bench import host_cost


@pytest.fixture(autouse=True)
def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent: runs once under the best path (the kernels are checked per path elsewhere)")


def test_host_times_syncs_before_each_timed_call_never_inside():
    events = []
    fns = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    raw = host_cost.host_times(fns, reps=5, warmup=2, sync=lambda: events.append("sync"))
    assert {k: len(v) for k, v in raw.items()} == {"a": 5, "b": 5}
    assert all(t >= 0 for v in raw.values() for t in v)
    calls = [e for e in events if e != "sync"]
    assert len(calls) == 2 * (5 + 2 + 1 + 1)  # reps, then a warm-up of 2 in round 1 and of 1 in rounds 2 and 3
    # every timed call follows a sync; warm-up calls don't need one; a final sync leaves the device idle
    assert events.count("sync") == 2 * 5 + 1 and events[-1] == "sync"
    assert events[:3] == ["a", "a", "sync"]  # round 1 of "a": 2 warm-ups, then sync + timed call


def test_summarize_slope_growth_and_the_cuda_target():
    med = {host_cost.OK_CLASS: {10: 20e-6, 100: 22e-6, 10000: 30e-6},
           host_cost.TORCH_FUSED: {10: 50e-6, 100: 300e-6, 10000: 25e-3}}
    rec = host_cost.summarize("cuda", [100, 10, 10000], med)
    assert rec["counts"] == [10, 100, 10000]
    assert rec["per_tensor_us"][host_cost.OK_CLASS] == pytest.approx((30 - 20) / (10000 - 10))
    assert rec["growth"][host_cost.TORCH_FUSED] == pytest.approx(500.0)
    (t,) = rec["targets"]
    assert t["status"] == "met" and t["value"] == pytest.approx(1.5) and "10,000 tensors" in t["what"]
    med[host_cost.OK_CLASS][10000] = 41e-6  # 2.05x: no longer independent of the count
    assert host_cost.summarize("cuda", [10, 100, 10000], med)["targets"][0]["status"] == "NOT met"
    assert host_cost.summarize("cpu", [10, 100, 10000], med)["targets"] == []  # the CPU host also computes


def test_markdown_table_cells():
    med = {host_cost.OK_CLASS: {10: 2e-5, 1000: 4e-3}, host_cost.TORCH_FUSED: {10: 1e-4, 1000: 8e-3}}
    lines = host_cost.markdown_table(host_cost.summarize("cuda", [10, 1000], med))
    assert lines[0] == "| implementation | 10 tensors | 1,000 tensors | us per tensor | growth |"
    assert lines[2] == "| optkern.torch.Adam | 20.0 us (5.0x) | 4.00 ms (2.0x) | 4.020 | 200.0x |"
    assert lines[3] == "| torch.optim.Adam(fused=True) | 100.0 us | 8.00 ms | 7.980 | 80.0x |"
    assert lines[-1].startswith("Target: optkern.torch.Adam: host time at 1,000 tensors <= 2x at 10: **NOT met**")


def test_every_implementation_steps():
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is the benchmark's reference")
    fns = host_cost.cases(torch, np, 5, "cpu", "NumPy")
    assert list(fns) == [host_cost.OK_CLASS, "optkern.adam_step (NumPy)", host_cost.TORCH_FUSED]
    opts = {k: fns[k].__self__ for k in (host_cost.OK_CLASS, host_cost.TORCH_FUSED)}
    before = {k: [p.detach().clone() for p in o.param_groups[0]["params"]] for k, o in opts.items()}
    for fn in fns.values():
        fn()
        fn()
    after = {k: [p.detach().clone() for p in o.param_groups[0]["params"]] for k, o in opts.items()}
    for k in opts:
        assert len(after[k]) == 5 and all(p.shape == (host_cost.SIZE,) for p in after[k])
        assert all(not torch.equal(a, b) for a, b in zip(before[k], after[k]))
    # optkern.torch.Adam and torch's fused Adam started from the same params and grads: two equal steps
    for a, b in zip(after[host_cost.OK_CLASS], after[host_cost.TORCH_FUSED]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_run_cpu_quick():
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is the benchmark's reference")
    rec = host_cost.run_cpu(torch, quick=True)
    assert rec["device"] == "cpu" and rec["counts"] == list(host_cost.QUICK_COUNTS)
    assert all(v > 0 for by in rec["median_s"].values() for v in by.values())
    assert set(rec["growth"]) == set(rec["median_s"]) and rec["targets"] == []


def test_main_quick_writes_the_table(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch==2.13.0 is the benchmark's reference")
    threads = optkern.get_num_threads(), torch.get_num_threads()
    try:
        assert host_cost.main(["--quick", "--out", str(tmp_path)]) == 0
    finally:  # main sets both libraries' thread counts (--threads 2): leave the other tests theirs
        optkern.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    (md,) = tmp_path.glob("cpu_*_2threads_host_cost.md")
    text = md.read_text()
    assert text.startswith("# Host time per Adam step against the tensor count")
    assert "`python -m optkern.bench.host_cost --quick --out" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "implementation" not in line]
    assert len(rows) == 3 and all(line.count("|") == 6 for line in rows)
    saved = json.loads(md.with_suffix(".json").read_text())
    assert saved["counts"] == [10, 100] and saved["meta"]["threads"] == 2
    assert "wrote" in capsys.readouterr().out
