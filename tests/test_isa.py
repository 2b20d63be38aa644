"""CPU instruction-set selection, the OPTKERN_CPU_ISA override, and thread-count control."""

import os
import subprocess
import sys

import numpy as np
import pytest

import optkern

ORDER = ("scalar", "avx2", "avx512")
SUPPORTED = [i for i in ORDER if ORDER.index(i) <= ORDER.index(optkern.cpu_best_isa())]
ONCE = os.environ.get("OPTKERN_CPU_ISA") or SUPPORTED[-1]  # the fixture value under which subprocess checks run


def _env(**extra):
    env = dict(os.environ)
    env.pop("OPTKERN_CPU_ISA", None)
    paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
    pkg = os.path.dirname(os.path.dirname(optkern.__file__))
    env["PYTHONPATH"] = os.pathsep.join([pkg] + [p for p in paths if p])
    env.update(extra)
    return env


def test_fixture_forced_path_is_reported(cpu_isa):
    assert optkern.cpu_isa() == cpu_isa


def test_best_isa_is_known_and_settable():
    assert optkern.cpu_best_isa() in ORDER
    for isa in SUPPORTED:
        optkern.set_cpu_isa(isa)
        assert optkern.cpu_isa() == isa


def test_unsupported_isa_rejected():
    unsupported = [i for i in ORDER if i not in SUPPORTED]
    before = optkern.cpu_isa()
    for isa in unsupported:
        with pytest.raises(ValueError, match="isa"):
            optkern.set_cpu_isa(isa)
        assert optkern.cpu_isa() == before


@pytest.mark.parametrize("name", ["bogus", "", "AVX2", "sse"])
def test_set_cpu_isa_bogus(name):
    before = optkern.cpu_isa()
    with pytest.raises(ValueError, match="isa"):
        optkern.set_cpu_isa(name)
    assert optkern.cpu_isa() == before


@pytest.mark.parametrize("isa", SUPPORTED)
def test_env_var_forces_path_at_import(isa, cpu_isa):
    if cpu_isa != ONCE:
        pytest.skip("subprocess check runs once (under the best path's fixture)")
    code = "import optkern, numpy as np; p = np.ones(3, np.float32); optkern.sgd_step(p, p.copy(), step=1, lr=0.5); " \
           "print(optkern.cpu_isa(), p[0])"
    r = subprocess.run([sys.executable, "-c", code], env=_env(OPTKERN_CPU_ISA=isa), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [isa, "0.5"]


@pytest.mark.parametrize("value", ["bogus", "avx1024"])
def test_env_var_bad_value_fails_import(value, cpu_isa):
    if cpu_isa != ONCE:
        pytest.skip("subprocess check runs once (under the best path's fixture)")
    r = subprocess.run([sys.executable, "-c", "import optkern; print('imported')"],
                       env=_env(OPTKERN_CPU_ISA=value), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "imported" not in r.stdout
    assert "ImportError" in r.stderr and "OPTKERN_CPU_ISA" in r.stderr and value in r.stderr


def test_env_var_unset_gives_best(cpu_isa):
    if cpu_isa != ONCE:
        pytest.skip("subprocess check runs once (under the best path's fixture)")
    r = subprocess.run([sys.executable, "-c", "import optkern; print(optkern.cpu_isa())"], env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == optkern.cpu_best_isa()


@pytest.fixture
def restore_threads():
    n = optkern.get_num_threads()
    yield n
    optkern.set_num_threads(n)


@pytest.mark.parametrize("bad", [0, -1, -100])
def test_set_num_threads_rejects_non_positive(bad, restore_threads):
    with pytest.raises(ValueError):
        optkern.set_num_threads(bad)
    assert optkern.get_num_threads() == restore_threads


def test_set_num_threads_round_trip(restore_threads):
    assert restore_threads >= 1
    for n in (1, 3, 2):
        optkern.set_num_threads(n)
        assert optkern.get_num_threads() == n
        p = np.ones(1 << 17, np.float32)
        optkern.sgd_step(p, np.ones_like(p), step=1, lr=0.25)
        assert np.all(p == 0.75)


def test_cuda_available_is_bool():
    assert isinstance(optkern.cuda_available(), bool)
