"""The mixed-precision benchmark (optkern.bench.mixed_precision) and the 16-bit training comparison
(optkern.bench.mixed_training), quick: that every case times a real step of the dtypes its byte count assumes, that
each competitor does the same job, and that the commands write their tables.  Structure only, never speed."""

import json

import numpy as np
import optkern
import pytest
from conftest import AVAILABLE_ISAS
from optkern.bench import mixed_precision as mp

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the benchmark's reference (its bf16 conversions too)")
pytest.importorskip("ml_dtypes", reason="NumPy bfloat16 arrays come from ml_dtypes (a dependency of optkern)")


@pytest.fixture(autouse=True)
def _once(cpu_isa):
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip("ISA-independent: runs once under the best path (the kernels are checked per path elsewhere)")


@pytest.fixture
def base():
    rng = np.random.default_rng(5)
    n = 1000  # not a multiple of any vector width or tile
    return rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)


# how often a step touches each array: written-only arrays once, read-only once, updated ones twice
_ACCESSES = {"param": 2, "grad": 1, "exp_avg": 2, "exp_avg_sq": 2, "masters[0]": 2, "param_copies[0]": 1}


@pytest.mark.parametrize("key", list(mp.MODES))
def test_each_case_steps_and_its_bytes_match_its_arrays(key, base):
    step, arrays = mp.optkern_case(torch, key, *base)
    assert "masters[0]" in arrays if key in ("bf16_fp32", "bf16_split") else "masters[0]" not in arrays
    assert ("param_copies[0]" in arrays) == (key == "offload")
    acc = dict(_ACCESSES)
    if key == "bf16_fp32":
        acc["param"] = 1  # written from the float32 master, never read
    n = arrays["param"].size
    assert mp.MODES[key][1] * n == sum(acc[k] * a.dtype.itemsize * a.size for k, a in arrays.items())
    assert eval(mp.MODES[key][2]) == mp.MODES[key][1]  # the formula printed in the table is the count
    want = {"float32": "float32", "offload": "float32", "fp16_none": "float16"}.get(key, "bfloat16")
    assert optkern.precision.dtype_name(arrays["param"]) == want
    before = {k: a.copy() for k, a in arrays.items()}
    step()
    step()
    changed = {k for k, a in arrays.items() if not np.array_equal(a, before[k])}
    assert changed == set(arrays) - {"grad"}  # the param, the state and any master / copy were all written


def test_competitors_do_the_same_job(base):
    """torch fused bf16 Adam and optkern's bf16 step with bf16 state are bit-identical (the README's claim); the
    float32 competitor matches optkern's float32 step; the two-pass competitors write their bf16 copy."""
    for key in mp.MODES:
        tstep, ts = mp.torch_case(torch, key, *base)
        assert (tstep is None) == (mp.MODES[key][3] is None)
        if tstep is None:
            continue
        step, arrays = mp.optkern_case(torch, key, *base)
        for _ in range(3):
            step()
            tstep()
        if key == "bf16_state_bf16":
            np.testing.assert_array_equal(arrays["param"].view(np.int16), ts["param"].view(torch.int16).numpy())
        elif key == "float32":
            np.testing.assert_allclose(arrays["param"], ts["param"].numpy(), rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(ts["copy"].float().numpy(), ts["param"].to(torch.bfloat16).float().numpy())
            assert not np.array_equal(ts["param"].numpy(), base[0])


def test_bench_mode_row():
    n = 4096
    pbase, gbase = np.ones(n, np.float32), np.full(n, 1e-2, np.float32)
    row = mp.bench_mode(torch, "bf16_fp32", n, pbase, gbase, reps=2, warmup=1, roof_fns=mp.roofline_fns(torch, n))
    assert set(row["raw_s"]) == {"optkern", "torch", "roof_numpy_add", "roof_torch_add_"}
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in row["raw_s"].values())
    assert row["bytes"] == 28 * n and row["roofline_gbs"] == max(row["row_roofline_gbs"].values())
    assert row["optkern_pct_roofline"] == pytest.approx(100 * row["optkern_gbs"] / row["roofline_gbs"])
    assert row["ratio"] == pytest.approx(row["torch_s"] / row["optkern_s"])
    assert [t["what"] for t in row["targets"]] == [">= 90% of roofline", ">= 1.5x " + mp.MODES["bf16_fp32"][3]]
    assert all(isinstance(t["met"], bool) for t in row["targets"])


def test_main_writes_the_table(tmp_path):
    threads = optkern.get_num_threads(), torch.get_num_threads()
    argv = ["--sizes", "1000", "--reps", "1", "--warmup", "1", "--out", str(tmp_path)]
    try:
        assert mp.main(argv) == 0
    finally:  # main sets both libraries' thread counts (--threads 2): leave the other tests theirs
        optkern.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
    (md,) = tmp_path.glob("cpu_*_2threads_mixed_precision.md")
    text = md.read_text()
    assert "`python -m optkern.bench.mixed_precision --sizes 1000 --reps 1" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert len(rows) == len(mp.MODES) and all(line.count("|") == 11 for line in rows)
    saved = json.loads(md.with_suffix(".json").read_text())
    assert [(r["n"], r["mode"]) for r in saved["rows"]] == [(1000, k) for k in mp.MODES]
    n_targets = sum(len(r["targets"]) for r in saved["rows"])
    assert n_targets == len(mp.MODES) + len(mp.RATIO_TARGETS)
    assert f"targets met: {sum(t['met'] for r in saved['rows'] for t in r['targets'])} / {n_targets}" in text


def test_training_comparison_quick(tmp_path):
    pytest.importorskip("sklearn", reason="the comparison trains on scikit-learn's digits: pip install '.[demo]'")
    from optkern.bench import mixed_training as mt

    results, meta = mt.run(epochs=2, lr=1e-4)
    assert [r["mode"] for r in results] == list(mt.MODES)
    assert meta["steps"] == 2 * 22 and all(r["steps"] == meta["steps"] for r in results)
    curves = {r["mode"]: r["curve"] for r in results}
    assert all(len(c) == 2 and all(np.isfinite(c)) for c in curves.values())
    # float32 updates almost every element; the bf16 stored params are left unchanged far more often
    un = {r["mode"]: r["unchanged"][-1] for r in results}
    assert un["float32"] < 0.2 and un["bf16 plain"] > un["float32"] + 0.3
    assert mt.main(["--epochs", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "mixed_training.md").read_text()
    assert "`python -m optkern.bench.mixed_training --epochs 1 --out" in text
    assert sum(line.startswith(("| bf16", "| float32")) for line in text.splitlines()) == 5
    with pytest.raises(ValueError, match="mode"):
        mt.train_mode("bf16", None, 1, 64, 1e-4, 0)
