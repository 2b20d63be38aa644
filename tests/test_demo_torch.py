"""The demo's PyTorch part in its quick mode: both runs train, agree, and the figures are returned."""

import pytest

import optkern

pytest.importorskip("torch", reason="the demo's PyTorch part needs torch==2.13.0")
pytest.importorskip("sklearn", reason="the demo trains on scikit-learn's digits: pip install '.[demo]'")


def test_quick_run_agrees(cpu_isa, tmp_path):
    if cpu_isa != optkern.cpu_best_isa():
        pytest.skip("demo smoke test: run once")
    from optkern import demo_torch

    out = demo_torch.run(str(tmp_path / "demo_torch.png"), quick=True)
    assert out is not None and out["agree"]
    runs = out["runs"]
    assert set(runs) == {"optkern.torch", "torch"}
    for r in runs.values():
        assert r["test_acc"] > 0.8 and r["train_loss"] < 1.0 and r["step_us"] > 0
