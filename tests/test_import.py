"""`import optkern` needs only NumPy: it never imports torch; `optkern.torch` (the attribute or the module) does."""

import subprocess
import sys

import pytest

import optkern

CODE = """
import sys
import optkern, optkern.optim, optkern.functional, optkern.batch_norm, optkern.lbfgs, optkern.schedules
import optkern.demo_torch
assert "torch" not in sys.modules, "import optkern imported torch"
import importlib.util
if importlib.util.find_spec("torch") is None:
    raise SystemExit(0)
front = optkern.torch  # the attribute imports the front end on first use
assert "torch" in sys.modules and front.AdamW.__mro__[2] is sys.modules["torch"].optim.AdamW
import optkern.torch.nn
print("ok")
"""


def test_import_optkern_never_imports_torch(cpu_isa):
    if cpu_isa != optkern.cpu_best_isa():
        pytest.skip("import test: ISA-independent, run once")
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
