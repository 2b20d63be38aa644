"""The CPU benchmark's noise rules (optkern.bench.verdicts), the bracketing roofline, --compare and the PNG's panels.

The rules decide whether a row gets a verdict; they are checked on synthetic rows so each threshold is hit exactly,
and the CPU suite is run once (small sizes) to see every row bracketed and judged.  No speed is asserted."""

import json

import numpy as np
import pytest

from optkern.bench import batch_norm as bn_bench
from optkern.bench import runner, verdicts


@pytest.fixture(autouse=True)
def _once(cpu_isa):
    import optkern

    if cpu_isa != optkern.cpu_best_isa():
        pytest.skip("ISA-independent: runs once under the best path (the kernels are checked per path elsewhere)")


def _row(**kw):
    row = {"kind": "algo", "case": "Adam", "n": 1 << 20, "optkern_s": 1e-3,
           "targets": [{"what": ">= 90% of roofline", "value": 95.0, "met": True},
                       {"what": ">= 2x torch", "value": 1.5, "met": False}]}
    row.update(kw)
    return row


def test_drift_is_relative_to_the_larger():
    assert verdicts.drift(100.0, 85.0) == pytest.approx(0.15)
    assert verdicts.drift(85.0, 100.0) == pytest.approx(0.15)
    assert verdicts.drift(0.0, 0.0) == 0.0


@pytest.mark.parametrize("after,noisy", [(86.0, False), (84.0, True), (100.0, False), (118.0, True)])
def test_a_roofline_that_moved_more_than_15_percent_makes_the_row_noisy(after, noisy):
    r = verdicts.judge(_row(roof_before_gbs=100.0, roof_after_gbs=after))
    assert r["noisy"] is noisy
    if noisy:
        assert "the roofline moved from 100.0 to" in r["noisy_why"][0]
        assert [t["status"] for t in r["targets"]] == ["noisy, rerun"] * 2 and all(t["met"] is None for t in r["targets"])
    else:
        assert r["noisy_why"] == [] and [t["status"] for t in r["targets"]] == ["met", "NOT met"]


@pytest.mark.parametrize("key", ["optkern_pct_roofline", "torch_pct_roofline", "pass1_pct_read", "direction_pct_read"])
def test_a_figure_above_110_percent_of_its_bound_makes_the_row_noisy(key):
    assert not verdicts.judge(_row(**{key: 110.0}))["noisy"]
    r = verdicts.judge(_row(**{key: 111.0}))
    assert r["noisy"] and "111%" in r["noisy_why"][0] and r["targets"][0]["met"] is None


@pytest.mark.parametrize("key", ["pass1_gbs", "read_best_gbs"])
def test_a_dram_read_faster_than_the_cached_add_is_noisy(key):
    assert not verdicts.judge(_row(roofline_cached_gbs=50.0, **{key: 54.9}))["noisy"]
    r = verdicts.judge(_row(roofline_cached_gbs=50.0, **{key: 55.1}))
    assert r["noisy"] and "faster than the add on cache-resident arrays" in r["noisy_why"][0]


def test_summary_counts_verdicts_over_clean_rows_only():
    rows = [verdicts.judge(_row()), verdicts.judge(_row(case="SGD", optkern_pct_roofline=365.0)),
            verdicts.judge(_row(case="one step", targets=[]))]
    line = verdicts.summary(rows)
    assert line.startswith("targets met: 1 / 2 (verdicts over the clean rows only); 1 of 3 rows noisy")
    assert "SGD at n=1,048,576" in line
    assert verdicts.summary([verdicts.judge(_row())]).endswith("no noisy rows (of 1)")


def test_bracketed_measures_before_and_after_the_row_and_judges_it():
    calls = []
    readings = iter([100.0, 70.0, 100.0, 96.0])

    def probe():
        calls.append("probe")
        return next(readings)

    def make():
        calls.append("row")
        return _row()

    r = runner.bracketed(probe, make)
    assert calls == ["probe", "row", "probe"]
    assert (r["roof_before_gbs"], r["roof_after_gbs"], r["noisy"]) == (100.0, 70.0, True)
    r = runner.bracketed(probe, make)
    assert (r["roof_after_gbs"], r["noisy"]) == (96.0, False) and r["targets"][0]["status"] == "met"


def test_add_probe_reports_the_faster_add():
    a, b = np.ones(1 << 16, np.float32), np.ones(1 << 16, np.float32)
    gbs = runner.add_probe({"add": lambda: np.add(a, b, out=a)}, 12 << 16, reps=3)()
    assert np.isfinite(gbs) and gbs > 0


def _run(date, rows):
    return {"meta": {"date": date, "cpu_model": "test cpu"}, "rows": rows}


def test_compare_prints_per_row_ratios_and_the_clean_geometric_mean():
    old = _run("d1", [_row(optkern_s=2e-3, ratio=1.0), _row(case="SGD", optkern_s=1e-3, ratio=2.0),
                      _row(case="gone", optkern_s=1e-3)])
    new = _run("d2", [_row(optkern_s=1e-3, ratio=2.0), _row(case="SGD", optkern_s=4e-3, ratio=0.5, noisy=True),
                      _row(case="fresh", optkern_s=1e-3)])
    text = runner.compare(old, new)
    assert "| Adam | 2^20 | 2.00 ms | 1.00 ms | 0.500 | 1.00x | 2.00x | - |" in text
    assert "| SGD | 2^20 | 1.00 ms | 4.00 ms | 4.000 | 2.00x | 0.50x | new |" in text
    assert "geometric mean of optkern's time new / old over 1 rows clean in both: 0.500" in text
    assert "new only: fresh (2^20)" in text and "old only: gone (2^20)" in text


def test_compare_from_the_command_line(tmp_path, capsys):
    paths = []
    for i, t in enumerate((1e-3, 1.1e-3)):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps(_run(f"d{i}", [_row(optkern_s=t)])))
        paths.append(str(p))
    assert runner.main(["--compare", *paths]) == 0
    assert "| Adam | 2^20 | 1.00 ms | 1.10 ms | 1.100 |" in capsys.readouterr().out


def test_the_plot_has_a_panel_for_every_suite():
    rows = [_row(torch_path="fused", optkern_pct_roofline=90.0, torch_pct_roofline=80.0),
            _row(n=1 << 22, optkern_pct_roofline=91.0),
            {"kind": "batch_norm", "case": "bn", "op": "forward train", "layout": "nchw", "shape": [2, 3, 4, 5],
             "n": 120, "optkern_pct_roofline": 50.0, "torch_gbs": 10.0, "roofline_gbs": 40.0},
            {"kind": "lbfgs", "case": "lb", "n": 1 << 18, "dtype": "float32", "optkern_pct_roofline": 70.0,
             "bytes": 1e9, "torch_s": 0.1, "roofline_gbs": 20.0, "noisy": True},
            {"kind": "scenario", "case": "one Adam step, 1024 elements", "n": 1024, "ratio": 12.0}]
    panels = runner._plot_panels({"rows": rows})
    titles = [p[0] for p in panels]
    assert titles == ["optimizer steps, n = 2^20 float32", "optimizer steps, n = 2^22 float32",
                      "batch norm (torch: aten)", "L-BFGS direction, m = 10 (torch: per-vector two-loop)",
                      "scenarios: speed-up over torch"]
    assert panels[0][3][0] == ("Adam\n(torch fused)", 90.0, 80.0, False)  # the torch path spelled out
    assert panels[2][3][0][2] == pytest.approx(25.0)  # torch's % of the roofline from its GB/s
    assert panels[3][3][0][2] == pytest.approx(50.0) and panels[3][3][0][3] is True  # noisy: hatched
    assert panels[4][3][0][:2] == ("one Adam step\n1024 elements", 12.0)


def test_batch_norm_suite_rows_are_bracketed_and_judged():
    rows = bn_bench.run_cpu(None, True, reps=1, warmup=0)
    assert len(rows) == bn_bench.num_cases(True)
    for r in rows:
        assert r["roof_before_gbs"] > 0 and r["roof_after_gbs"] > 0
        assert isinstance(r["noisy"], bool) and all("status" in t for t in r["targets"])


def test_the_cpu_suite_writes_a_judged_table(tmp_path):
    pytest.importorskip("torch", reason="the suite's torch columns: pip install torch==2.13.0")
    assert runner.main(["--suite", "optim", "--sizes", "2^16", "--algos", "Adam", "--reps", "3", "--no-progress",
                        "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "bench_cpu.json").read_text())
    algo = [r for r in saved["rows"] if r["kind"] == "algo"]
    assert len(algo) == 1 and algo[0]["roof_before_gbs"] > 0 and "noisy" in algo[0]
    text = (tmp_path / "bench_cpu.md").read_text()
    assert "roofline before / after" in text and verdicts.summary(saved["rows"]) in text
