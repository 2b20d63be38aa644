"""Changing a param group's hyperparameters between steps (as torch users do) takes effect at the next step."""

import numpy as np
import pytest

import optkern

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the reference here: pip install torch==2.13.0")


@pytest.mark.parametrize("key,value", [("lr", 0.05), ("momentum", 0.9), ("weight_decay", 0.1), ("nesterov", True)])
def test_sgd_group_change_mid_run_matches_torch(rng, key, value):
    p = rng.standard_normal(50)
    tp = torch.tensor(p.copy())
    opt = optkern.optim.SGD([p], lr=0.01, momentum=0.5 if key == "nesterov" else 0.0)
    ref = torch.optim.SGD([tp], lr=0.01, momentum=0.5 if key == "nesterov" else 0.0)
    for k in range(10):
        if k == 5:
            opt.param_groups[0][key] = value
            ref.param_groups[0][key] = value
        g = rng.standard_normal(50)
        tp.grad = torch.tensor(g)
        opt.step([g])
        ref.step()
    np.testing.assert_allclose(p, tp.numpy(), rtol=1e-12, atol=1e-14)


def test_adam_amsgrad_switched_on_allocates_its_buffer(rng):
    p = rng.standard_normal(20)
    opt = optkern.optim.Adam([p], lr=0.01)
    for k in range(4):
        if k == 2:
            opt.param_groups[0]["amsgrad"] = True
        opt.step([rng.standard_normal(20)])
    assert opt.state[0]["step"] == 4
    assert np.all(opt.state[0]["max_exp_avg_sq"] >= opt.state[0]["exp_avg_sq"])


def test_load_state_dict_with_same_shaped_groups(rng):
    """Groups whose params have equal shapes (dict equality would compare arrays) round-trip bit for bit."""
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    opt = optkern.optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.1}])
    grads = [[rng.standard_normal((5, 5)) for _ in range(2)] for _ in range(4)]
    opt.step(grads[0])
    sd = opt.state_dict()
    a2, b2 = a.copy(), b.copy()
    fresh = optkern.optim.Adam([{"params": [a2]}, {"params": [b2], "lr": 0.1}])
    fresh.load_state_dict(sd)
    for g in grads[1:]:
        opt.step(g)
        fresh.step(g)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
