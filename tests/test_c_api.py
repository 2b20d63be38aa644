"""optkern's C interface (liboptkern, csrc/include/optkern/optkern.h) as the wheel ships it.

a. packaging: optkern.cmake_dir() / include_dir() / lib_dir() / library_path() / pkgconfig_dir(), ``python -m
   optkern --cmake-dir`` etc., the exported symbols (only optkern_*, every function of the header), one core.
b. the examples: examples/c (cc with ``python -m optkern`` flags, and pkg-config) and examples/cpp (CMake,
   find_package(optkern)) built in tmp_path, run, and their printed params compared bit for bit with the same
   computation through the Python API.
c. tests/c/test_c_api.c: bad input from C (status, message, nothing written), built and run here.
d. correctness through ctypes: every optimizer, 16-bit params with float32 masters, global norms, batch norm
   and the L-BFGS kernels against the Python API, bit for bit (the same core), and the statuses as errors.

conftest.py runs every test on each CPU path (the C library and optkern._C share liboptkern_core, so
optkern.set_cpu_isa switches both); the tests that do not depend on the path run once.  The build tests skip
(saying why) where no C compiler, C++ compiler or cmake is found.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import shutil
import subprocess
import sys
from ctypes import POINTER, byref, c_char_p, c_double, c_int32, c_int64, c_size_t, c_uint64, c_void_p

import ml_dtypes
import numpy as np
import pytest

import optkern
from conftest import AVAILABLE_ISAS
from optkern import _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "csrc", "include", "optkern", "optkern.h")
BF16 = np.dtype(ml_dtypes.bfloat16)

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
CMAKE = shutil.which("cmake")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH: cannot build the C "
                                                 "programs")
needs_cmake = pytest.mark.skipif(CMAKE is None or CXX is None,
                                 reason=f"examples/cpp needs cmake and a C++ compiler; found cmake={CMAKE}, "
                                        f"c++={CXX}")


@pytest.fixture
def once(cpu_isa):
    """Tests that do not depend on the CPU path (or force the paths themselves) run under the best one only."""
    if cpu_isa != AVAILABLE_ISAS[-1]:
        pytest.skip(f"independent of the CPU path: runs once (under {AVAILABLE_ISAS[-1]})")


# ---- the structs and functions of optkern.h, through ctypes -----------------------------------------------------
STATUS = {0: "OPTKERN_OK", 1: "OPTKERN_INVALID_ARGUMENT", 2: "OPTKERN_UNSUPPORTED", 3: "OPTKERN_CUDA_ERROR",
          4: "OPTKERN_INTERNAL_ERROR"}
OK, INVALID, UNSUPPORTED = 0, 1, 2
DTYPE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, BF16: 2, np.dtype(np.float16): 3, np.dtype(np.int16): 4}
MASTER_FP32, MASTER_SPLIT = 1, 2


class OptkernError(Exception):
    """A failed call: .status (the optkern_status) and .name ('OPTKERN_INVALID_ARGUMENT', ...)."""

    def __init__(self, status: int, message: str):
        self.status, self.name, self.message = status, STATUS.get(status, f"status {status}"), message
        super().__init__(f"{self.name}: {message}")


class Tensors(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("dtype", c_int32), ("device", c_int32), ("device_index", c_int32),
                ("stream", c_void_p), ("count", c_int64), ("numels", POINTER(c_int64)),
                ("params", POINTER(c_void_p)), ("grads", POINTER(c_void_p)), ("states", POINTER(c_void_p) * 3),
                ("mixed", c_int32), ("grad_dtype", c_int32), ("state_dtype", c_int32), ("master_mode", c_int32),
                ("masters", POINTER(c_void_p)), ("param_copies", POINTER(c_void_p)), ("copy_dtype", c_int32),
                ("stochastic_rounding", c_int32), ("seed", c_uint64), ("steps", POINTER(c_void_p)),
                ("mu_products", POINTER(c_void_p))]


class StepInfo(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("step", c_int64), ("grad_scale", c_double), ("maximize", c_int32),
                ("grad_scale_device", c_void_p), ("found_inf_device", c_void_p), ("counters_in_memory", c_int32),
                ("counter_dtype", c_int32), ("product_dtype", c_int32)]


class Arrays(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("dtype", c_int32), ("device", c_int32), ("device_index", c_int32),
                ("stream", c_void_p), ("count", c_int64), ("numels", POINTER(c_int64)), ("data", POINTER(c_void_p))]


class BnArgs(ctypes.Structure):
    _fields_ = ([("struct_size", c_size_t), ("dtype", c_int32), ("device", c_int32), ("device_index", c_int32),
                 ("stream", c_void_p), ("outer", c_int64), ("channels", c_int64), ("inner", c_int64)]
                + [(f, c_void_p) for f in ("x", "dy", "out", "weight", "bias", "running_mean", "running_var",
                                           "dweight", "dbias", "mean", "invstd", "m2", "sum_dy", "sum_dy_xmu")]
                + [("eps", c_double), ("momentum", c_double), ("count", c_int64)])


# the hyperparameter structs: (double fields, int32 fields), in optkern.h's order
HYPER_FIELDS = {
    "sgd": (("lr", "momentum", "dampening", "weight_decay"), ("nesterov", "velocity")),
    "adam": (("lr", "beta1", "beta2", "eps", "weight_decay"),
             ("amsgrad", "decoupled_weight_decay", "eps_inside_sqrt", "bias_correction")),
    "adagrad": (("lr", "lr_decay", "weight_decay", "eps"), ()),
    "rmsprop": (("lr", "alpha", "eps", "weight_decay", "momentum"), ("centered", "eps_inside_sqrt", "nesterov")),
    "adamax": (("lr", "beta1", "beta2", "eps", "weight_decay"), ()),
    "nadam": (("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay"),
              ("decoupled_weight_decay", "momentum_schedule")),
    "adadelta": (("lr", "rho", "eps", "weight_decay"), ()),
    "rprop": (("lr", "etaminus", "etaplus", "step_size_min", "step_size_max"), ()),
}
HYPER = {algo: type(f"optkern_{algo}_hyper", (ctypes.Structure,),
                    {"_fields_": [("struct_size", c_size_t)] + [(f, c_double) for f in d] + [(f, c_int32) for f in i]})
         for algo, (d, i) in HYPER_FIELDS.items()}
STRUCTS = {"optkern_tensors": Tensors, "optkern_step_info": StepInfo, "optkern_arrays": Arrays,
           "optkern_batch_norm_args": BnArgs, **{f"optkern_{a}_hyper": s for a, s in HYPER.items()}}


def _signatures():
    """name -> (restype, argtypes) for every function of optkern.h (restype c_int32 for an optkern_status)."""
    T, I, A, B = POINTER(Tensors), POINTER(StepInfo), POINTER(Arrays), POINTER(BnArgs)
    st = "status"
    sig = {
        "optkern_version": (c_char_p, []), "optkern_abi_version": (c_int32, []),
        "optkern_last_error": (c_char_p, []), "optkern_cpu_isa": (c_char_p, []),
        "optkern_cpu_best_isa": (c_char_p, []), "optkern_set_cpu_isa": (st, [c_char_p]),
        "optkern_set_num_threads": (st, [c_int32]), "optkern_get_num_threads": (c_int32, []),
        "optkern_cuda_built": (c_int32, []), "optkern_cuda_available": (c_int32, []),
        "optkern_tensors_init": (None, [T]), "optkern_step_info_init": (None, [I]),
        "optkern_arrays_init": (None, [A]), "optkern_batch_norm_args_init": (None, [B]),
        "optkern_global_norm": (st, [A, c_double, POINTER(c_double)]),
        "optkern_global_norm_device": (st, [A, c_double, c_void_p, c_void_p, c_void_p, c_double]),
        "optkern_lbfgs_dots": (st, [A, A, c_void_p]),
        "optkern_lbfgs_lincomb": (st, [A, c_void_p, c_void_p]),
        "optkern_lbfgs_direction": (st, [A, A, c_void_p, c_void_p, POINTER(c_double)]),
        "optkern_batch_norm_combine": (st, [B, c_int64, c_void_p, c_void_p, c_void_p]),
    }
    for call in ("forward_train", "forward_eval", "backward_train", "backward_eval", "stats", "normalize",
                 "backward_reduce", "backward_dx"):
        sig[f"optkern_batch_norm_{call}"] = (st, [B])
    for algo, H in HYPER.items():
        sig[f"optkern_{algo}_hyper_init"] = (None, [POINTER(H)])
        sig[f"optkern_{algo}_num_states"] = (st, [POINTER(H), POINTER(c_int32)])
        extra = [POINTER(c_double), c_int32] if algo == "nadam" else []
        sig[f"optkern_{algo}_step"] = (st, [T, POINTER(H), I] + extra)
    return sig


SIGNATURES = _signatures()


@functools.lru_cache(maxsize=None)  # one handle (py3.9: no functools.cache)
def _load():
    lib = ctypes.CDLL(optkern.library_path())

    def errcheck(result, func, args):
        if result != OK:
            raise OptkernError(result, lib.optkern_last_error().decode())
        return result

    for name, (res, args) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        if res == "status":
            fn.restype = c_int32
            fn.errcheck = errcheck
        else:
            fn.restype = res
    return lib


@pytest.fixture
def lib(cpu_isa):
    lib = _load()
    assert lib.optkern_cpu_isa().decode() == cpu_isa, "liboptkern and optkern._C do not share the core's setting"
    return lib


def _init(lib, S):
    s = S()
    name = next(k for k, v in STRUCTS.items() if v is S)
    getattr(lib, name + "_init")(byref(s))
    return s


def _ptrs(arrays):
    return (c_void_p * max(len(arrays), 1))(*[a.ctypes.data for a in arrays])


def _numels(arrays):
    return (c_int64 * max(len(arrays), 1))(*[a.size for a in arrays])


def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bad = np.flatnonzero(_bits(got) != _bits(want))
    assert bad.size == 0, (f"{what}: {bad.size} of {got.size} elements differ, first at {bad[0]}: C "
                           f"{got.ravel()[bad[0]]!r}, Python {want.ravel()[bad[0]]!r}")


class CStep:
    """An optkern_tensors over lists of NumPy arrays (kept alive with it)."""

    def __init__(self, lib, params, grads, states, masters=None):
        t = _init(lib, Tensors)
        self.keep = [_numels(params), _ptrs(params), _ptrs(grads)] + [_ptrs(s) for s in states]
        t.dtype, t.count = DTYPE[params[0].dtype], len(params)
        t.numels, t.params, t.grads = self.keep[0], self.keep[1], self.keep[2]
        for k, s in enumerate(self.keep[3:]):
            t.states[k] = s
        if masters is not None:
            self.keep.append(_ptrs(masters))
            t.mixed, t.grad_dtype, t.state_dtype = 1, DTYPE[grads[0].dtype], DTYPE[states[0][0].dtype]
            t.master_mode = MASTER_FP32 if masters[0].dtype == np.float32 else MASTER_SPLIT
            t.masters = self.keep[-1]
        self.t = t


def _hyper(lib, algo, fields):
    h = _init(lib, HYPER[algo])
    for k, v in fields.items():
        setattr(h, k, v)
    return h


def _info(lib, step):
    s = _init(lib, StepInfo)
    s.step = step
    return s


# ---- a. packaging -------------------------------------------------------------------------------------------
def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "optkern", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"python -m optkern {' '.join(args)}: {r.stderr}"
    lines = r.stdout.splitlines()
    assert len(lines) == 1, f"python -m optkern {' '.join(args)} printed {r.stdout!r}"
    return lines[0]


def test_paths_exist(once):
    lib_dir = optkern.lib_dir()
    assert os.path.isfile(optkern.library_path()) and os.path.dirname(optkern.library_path()) == lib_dir
    assert os.path.basename(optkern.library_path()) == "liboptkern.so" or sys.platform != "linux"
    assert os.path.isfile(os.path.join(optkern.include_dir(), "optkern", "optkern.h"))
    for f in ("optkernConfig.cmake", "optkernConfigVersion.cmake", "optkernTargets.cmake"):
        assert os.path.isfile(os.path.join(optkern.cmake_dir(), f)), f
    assert os.path.isfile(os.path.join(optkern.pkgconfig_dir(), "optkern.pc"))
    # the wheel's layout: everything inside the package directory
    pkg = os.path.dirname(os.path.abspath(optkern.__file__))
    for d in (lib_dir, optkern.include_dir(), optkern.cmake_dir(), optkern.pkgconfig_dir()):
        assert os.path.commonpath([pkg, d]) == pkg, d
    with open(os.path.join(optkern.include_dir(), "optkern", "optkern.h")) as f, open(HEADER) as g:
        assert f.read() == g.read(), "the installed optkern.h is not the source tree's"
    for name in ("cmake_dir", "include_dir", "lib_dir", "library_path", "pkgconfig_dir"):
        assert name in optkern.__all__


def test_cli_prints_the_paths(once):
    assert _cli("--cmake-dir") == optkern.cmake_dir()
    assert _cli("--include-dir") == optkern.include_dir()
    assert _cli("--lib-dir") == optkern.lib_dir()
    assert _cli("--pkgconfig-dir") == optkern.pkgconfig_dir()
    d = optkern.lib_dir()
    assert _cli("--libs") == f"-L{d} -loptkern -Wl,-rpath,{d}"
    assert _cli("--version") == optkern.__version__ == _load().optkern_version().decode()
    r = subprocess.run([sys.executable, "-m", "optkern", "--lib-dir", "--cmake-dir"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "not allowed with" in r.stderr  # one question at a time


def test_paths_missing_raise(once, monkeypatch, tmp_path, capsys):
    """A source checkout that was not installed into python/: a RuntimeError that says what to do."""
    import optkern.__main__ as cli
    from optkern import _paths

    monkeypatch.setattr(_paths, "_PKG", str(tmp_path))
    for fn in (optkern.cmake_dir, optkern.include_dir, optkern.lib_dir, optkern.library_path,
               optkern.pkgconfig_dir):
        with pytest.raises(RuntimeError, match=r"not found at .*cmake --install"):
            fn()
    assert cli.main(["--cmake-dir"]) == 1
    assert "optkernConfig.cmake not found" in capsys.readouterr().err


def _header_functions():
    with open(HEADER) as f:
        text = f.read()
    return re.findall(r"OPTKERN_API\s+[\w\s\*]*?\b(optkern_\w+)\s*\(", text)


def test_exports_only_optkern_symbols(once):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not on PATH")
    r = subprocess.run([nm, "-D", "--defined-only", optkern.library_path()], capture_output=True, text=True,
                       check=True)
    names = {line.split()[-1].split("@")[0] for line in r.stdout.splitlines() if line.strip()}
    stray = sorted(n for n in names if not n.startswith("optkern_"))
    assert not stray, f"liboptkern exports symbols outside optkern_*: {stray[:20]}"
    declared = _header_functions()
    assert len(declared) == len(set(declared)) and len(declared) > 50
    missing = sorted(set(declared) - names)
    assert not missing, f"declared in optkern.h but not exported: {missing}"
    extra = sorted(names - set(declared))
    assert not extra, f"exported but not declared in optkern.h: {extra}"
    assert set(declared) == set(SIGNATURES), "this test's ctypes table does not cover optkern.h"


def _header_structs():
    """struct name -> [(field, kind)] parsed from optkern.h; kind: the C type, or 'pointer'."""
    with open(HEADER) as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.DOTALL)
    out = {}
    for name, body in re.findall(r"typedef struct (optkern_\w+) \{(.*?)\}", text, flags=re.DOTALL):
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if not decl:
                continue
            first, *rest = [p.strip() for p in decl.split(",")]
            m = re.match(r"(.*?)(\w+)(\[\w+\])?$", first)
            ctype = m.group(1).strip()
            for n in [m.group(2)] + rest:
                fields.append((n, "pointer" if "*" in ctype else ctype))
        out[name] = fields
    return out


_CTYPE = {"size_t": c_size_t, "int32_t": c_int32, "int64_t": c_int64, "uint64_t": c_uint64, "double": c_double}


def _is_pointer(t):
    if issubclass(t, ctypes.Array):
        t = t._type_
    return t in (c_void_p, c_char_p) or issubclass(t, ctypes._Pointer)


def test_ctypes_structs_mirror_the_header(once):
    lib = _load()
    parsed = _header_structs()
    assert set(parsed) == set(STRUCTS)
    for name, S in STRUCTS.items():
        assert [f for f, _ in S._fields_] == [f for f, _ in parsed[name]], f"{name}: the fields or their order"
        for (f, t), (_, kind) in zip(S._fields_, parsed[name]):
            assert _is_pointer(t) if kind == "pointer" else t is _CTYPE[kind], f"{name}.{f}: {kind} vs {t}"
        s = _init(lib, S)
        assert s.struct_size == ctypes.sizeof(S), f"{name}: the library's sizeof differs from ctypes'"
    # the defaults of the _init functions are the core's (torch.optim's), as the Python layer builds them
    for algo, (doubles, ints) in HYPER_FIELDS.items():
        core = getattr(_C, {"sgd": "SgdHyper", "adam": "AdamHyper", "adagrad": "AdagradHyper",
                            "rmsprop": "RmspropHyper", "adamax": "AdamaxHyper", "nadam": "NadamHyper",
                            "adadelta": "AdadeltaHyper", "rprop": "RpropHyper"}[algo])()
        h = _init(lib, HYPER[algo])
        for f in doubles + ints:
            assert getattr(h, f) == getattr(core, f), f"{algo}.{f}"
    t, s, b = _init(lib, Tensors), _init(lib, StepInfo), _init(lib, BnArgs)
    assert (t.dtype, t.device, t.count, t.mixed, bool(t.params)) == (0, 0, 0, 0, False)
    assert (s.step, s.grad_scale, s.counters_in_memory) == (1, 1.0, 0)
    assert (b.eps, b.momentum, b.count) == (1e-5, 0.1, 0)
    assert lib.optkern_abi_version() == 1
    with open(HEADER) as f:
        assert re.search(r"#define OPTKERN_ABI_VERSION 1\b", f.read())


def test_one_core_shared_with_the_extension(once):
    """liboptkern and optkern._C load the same liboptkern_core: the CPU path and threads are one setting."""
    lib = _load()
    if os.path.exists("/proc/self/maps"):
        with open("/proc/self/maps") as f:
            cores = {line.split()[-1] for line in f if line.rstrip().endswith("liboptkern_core.so")}
        assert len(cores) == 1, f"liboptkern_core loaded more than once: {cores}"
    isa0, nt0 = optkern.cpu_isa(), optkern.get_num_threads()
    try:
        for isa in AVAILABLE_ISAS:
            optkern.set_cpu_isa(isa)
            assert lib.optkern_cpu_isa().decode() == isa
        lib.optkern_set_cpu_isa(AVAILABLE_ISAS[0].encode())
        assert optkern.cpu_isa() == AVAILABLE_ISAS[0]
        assert lib.optkern_cpu_best_isa().decode() == optkern.cpu_best_isa()
        optkern.set_num_threads(1)
        assert lib.optkern_get_num_threads() == 1
        lib.optkern_set_num_threads(2)
        assert optkern.get_num_threads() == 2
    finally:
        optkern.set_cpu_isa(isa0)
        optkern.set_num_threads(nt0)
    assert lib.optkern_cuda_built() in (0, 1) and lib.optkern_cuda_available() == int(optkern.cuda_available())


# ---- b. the examples ------------------------------------------------------------------------------------------
def _lcg(seed):
    """The examples' generator: x <- 1664525 x + 1013904223 (mod 2^32), value (x >> 8) 2^-23 - 1 in float32."""
    state = [seed]

    def draw(n):
        out = np.empty(n, np.float32)
        x = state[0]
        for i in range(n):
            x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
            out[i] = x >> 8
        state[0] = x
        return out * np.float32(2.0 ** -23) - np.float32(1.0)

    return draw


def _run_program(path, *args):
    r = subprocess.run([path, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{path} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def _values_and_path(out):
    """The '#' lines' CPU path and the printed values (strings, "%.9g")."""
    lines = out.splitlines()
    isa = re.search(r"CPU path (\w+)", "\n".join(line for line in lines if line.startswith("#"))).group(1)
    return isa, [line for line in lines if not line.startswith("#")]


def _formatted(arrays):
    return ["%.9g" % float(v) for a in arrays for v in a]


def _compare_printed(out, compute):
    """The program's values against compute() under the same CPU path (the string "%.9g" of a float32 is exact)."""
    isa, got = _values_and_path(out)
    before = optkern.cpu_isa()
    try:
        optkern.set_cpu_isa(isa)
        want = _formatted(compute())
    finally:
        optkern.set_cpu_isa(before)
    assert len(got) == len(want)
    diff = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not diff, f"{len(diff)} values differ, first at {diff[0]}: C {got[diff[0]]}, Python {want[diff[0]]}"


def _adam_example_in_python():
    draw = _lcg(12345)
    sizes = (1000, 17, 1)
    params = [draw(n) for n in sizes]
    m = [np.zeros(n, np.float32) for n in sizes]
    v = [np.zeros(n, np.float32) for n in sizes]
    for t in range(1, 6):
        grads = [np.float32(0.5) * draw(n) for n in sizes]
        optkern.adam_step(params, grads, m, v, step=t, lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)
    return params


def _sgd_example_in_python():
    draw = _lcg(2024)
    sizes = (513, 8, 1)
    params = [draw(n) for n in sizes]
    bufs = [np.zeros(n, np.float32) for n in sizes]
    for t in range(1, 5):
        grads = [np.float32(0.5) * draw(n) for n in sizes]
        optkern.sgd_step(params, grads, bufs, step=t, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    return params


def _build_c(src, out, extra_flags=()):
    inc = _cli("--include-dir")
    libs = _cli("--libs").split()
    cmd = [CC, "-std=c99", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", src, f"-I{inc}", *libs, *extra_flags,
           "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    return out


@needs_cc
def test_c_example(once, tmp_path):
    exe = _build_c(os.path.join(ROOT, "examples", "c", "adam.c"), str(tmp_path / "adam"))
    out = _run_program(exe)
    assert f"# optkern {optkern.__version__} " in out
    bad = re.search(r"# bad call \(count = -1\): status (\d+): (.*)", out)
    assert bad and int(bad.group(1)) == INVALID and "tensors->count" in bad.group(2)
    _compare_printed(out, _adam_example_in_python)


@needs_cc
def test_c_example_with_pkg_config(once, tmp_path):
    pkg_config = shutil.which("pkg-config") or shutil.which("pkgconf")
    if pkg_config is None:
        pytest.skip("pkg-config not on PATH")
    env = dict(os.environ, PKG_CONFIG_PATH=optkern.pkgconfig_dir())
    r = subprocess.run([pkg_config, "--cflags", "--libs", "optkern"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    flags = r.stdout.split()
    includes = [os.path.realpath(f[2:]) for f in flags if f.startswith("-I")]
    assert os.path.realpath(optkern.include_dir()) in includes, flags
    r2 = subprocess.run([pkg_config, "--modversion", "optkern"], capture_output=True, text=True, env=env, timeout=60)
    assert r2.stdout.strip() == optkern.__version__
    exe = str(tmp_path / "adam_pc")
    cmd = [CC, "-std=c99", "-O2", os.path.join(ROOT, "examples", "c", "adam.c"), *flags, "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    _compare_printed(_run_program(exe), _adam_example_in_python)


@needs_cmake
def test_cpp_example_with_cmake(once, tmp_path):
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = [CMAKE, "-S", os.path.join(ROOT, "examples", "cpp"), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
           f"-Doptkern_DIR={_cli('--cmake-dir')}"]
    for cmd in (cfg, [CMAKE, "--build", str(build)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    out = _run_program(str(build / "sgd_nesterov"))
    assert f"CPU path {optkern.cpu_best_isa()}" in out  # the library's default: the best path
    _compare_printed(out, _sgd_example_in_python)


# ---- c. bad input from C --------------------------------------------------------------------------------------
@needs_cc
def test_c_program_bad_input(once, tmp_path):
    src = os.path.join(ROOT, "tests", "c", "test_c_api.c")
    exe = _build_c(src, str(tmp_path / "test_c_api"), ["-lm", "-pthread"])
    r = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert r.returncode == 0 and not failed, f"tests/c/test_c_api.c (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert re.search(r"^(\d+) checks, 0 failures$", r.stdout, flags=re.MULTILINE)
    assert int(re.search(r"^(\d+) checks", r.stdout, flags=re.MULTILINE).group(1)) > 100


# ---- d. correctness through ctypes ------------------------------------------------------------------------------
SIZES = [1, 7, 33, 1000, 4099]

# name: (algo, the C struct's fields over its _init defaults)
OPT_CASES = {
    "sgd": ("sgd", dict(lr=0.05)),
    "sgd_momentum": ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": ("sgd", dict(lr=0.05, momentum=0.9, nesterov=1, weight_decay=0.01)),
    "adam": ("adam", dict(lr=1e-2)),
    "adam_amsgrad": ("adam", dict(lr=1e-2, amsgrad=1, weight_decay=0.1)),
    "adamw": ("adam", dict(lr=1e-2, weight_decay=0.01, decoupled_weight_decay=1)),
    "adagrad": ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01)),
    "rmsprop": ("rmsprop", dict(lr=1e-2)),
    "rmsprop_centered_momentum": ("rmsprop", dict(lr=1e-2, centered=1, momentum=0.9, weight_decay=0.01)),
    "adamax": ("adamax", dict(lr=2e-3, weight_decay=0.01)),
    "nadam": ("nadam", dict(lr=2e-3)),
    "nadam_decoupled": ("nadam", dict(lr=2e-3, weight_decay=0.01, decoupled_weight_decay=1)),
    "adadelta": ("adadelta", dict(lr=1.0, weight_decay=0.01)),
    "rprop": ("rprop", dict(lr=1e-2)),
}
_BOOLS = {i for _, ints in HYPER_FIELDS.values() for i in ints}


def _python_kwargs(algo, fields):
    """The functional layer's keywords for the C fields (over the C defaults: every field is passed)."""
    h = _c_defaults(algo)
    h.update(fields)
    kw = {k: (bool(v) if k in _BOOLS else v) for k, v in h.items()}
    if "beta1" in kw:
        kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
    if algo == "rprop":
        kw["etas"] = (kw.pop("etaminus"), kw.pop("etaplus"))
        kw["step_size_limits"] = (kw.pop("step_size_min"), kw.pop("step_size_max"))
    return kw


def _c_defaults(algo):
    h = _init(_load(), HYPER[algo])
    return {f: getattr(h, f) for f in HYPER_FIELDS[algo][0] + HYPER_FIELDS[algo][1]}


def _initial_states(algo, fields, n_states, params, dtype):
    states = [[np.zeros_like(p, dtype=dtype) for p in params] for _ in range(n_states)]
    if algo == "rprop":
        for s in states[1]:
            s[...] = fields["lr"]  # step sizes start at lr
    return states


def _python_step(algo, params, grads, states, t, kw, mu_product, **storage):
    fn = getattr(optkern, f"{algo}_step")
    if algo == "nadam":
        return fn(params, grads, *states, step=t, mu_product=mu_product, **kw, **storage)
    fn(params, grads, *(states or [None]), step=t, **kw, **storage)
    return None


def _c_step(lib, algo, h, step, t, mu_product):
    fn = getattr(lib, f"optkern_{algo}_step")
    info = _info(lib, t)
    if algo == "nadam":
        mu = c_double(mu_product)
        fn(byref(step.t), byref(h), byref(info), byref(mu), 0)
        return mu.value
    fn(byref(step.t), byref(h), byref(info))
    return None


def _num_states(lib, algo, h):
    n = c_int32(-1)
    getattr(lib, f"optkern_{algo}_num_states")(byref(h), byref(n))
    return n.value


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimizer_matches_python(lib, case, dtype, rng):
    algo, fields = OPT_CASES[case]
    h = _hyper(lib, algo, fields)
    kw = _python_kwargs(algo, fields)
    n_states = _num_states(lib, algo, h)
    assert n_states == {"sgd": 0 if case == "sgd" else 1, "adam": 3 if "amsgrad" in case else 2, "adagrad": 1,
                        "rmsprop": 3 if "centered" in case else 1}.get(algo, 2)
    pc = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    p0 = [p.copy() for p in pc]
    sc = _initial_states(algo, fields, n_states, pc, dtype)
    pp, sp = [p.copy() for p in pc], [[s.copy() for s in lst] for lst in sc]
    mu_c = mu_py = 1.0
    for t in range(1, 4):
        grads = [rng.standard_normal(n).astype(dtype) for n in SIZES]
        mu_c = _c_step(lib, algo, h, CStep(lib, pc, grads, sc), t, mu_c)
        mu_py = _python_step(algo, pp, grads, sp, t, kw, mu_py)
        for i in range(len(SIZES)):
            assert_bits(pc[i], pp[i], f"step {t} params[{i}]")
            for k in range(n_states):
                assert_bits(sc[k][i], sp[k][i], f"step {t} states[{k}][{i}]")
        if algo == "nadam":
            assert mu_c == mu_py and 0.0 < mu_c < 1.0, f"step {t} mu_product: C {mu_c!r}, Python {mu_py!r}"
    assert all(not np.array_equal(a, b) for a, b in zip(pc, p0))  # the steps moved every tensor


@pytest.mark.parametrize("counter_dtype", [np.float32, np.float64], ids=["f32_counter", "f64_counter"])
@pytest.mark.parametrize("case", ["adam", "sgd_momentum", "nadam"])
def test_step_info_fields_match_python(lib, case, counter_dtype, rng):
    """optkern_step_info's grad_scale, maximize and counters in memory (one counter shared by every tensor, NAdam's
    product too) against grad_multiplier=, maximize= and step= / mu_product= one-element arrays in Python."""
    algo, fields = OPT_CASES[case]
    h = _hyper(lib, algo, fields)
    kw = _python_kwargs(algo, fields)
    n_states = _num_states(lib, algo, h)
    sizes = [7, 1000, 1]
    pc = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    sc = _initial_states(algo, fields, n_states, pc, np.float32)
    pp, sp = [p.copy() for p in pc], [[s.copy() for s in lst] for lst in sc]
    steps_c, steps_p = np.zeros(1, counter_dtype), np.zeros(1, counter_dtype)
    mu_c, mu_p = np.ones(1, np.float64), np.ones(1, np.float64)
    for t in range(1, 4):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        step = CStep(lib, pc, grads, sc)
        step.keep += [(c_void_p * 3)(*[steps_c.ctypes.data] * 3), (c_void_p * 3)(*[mu_c.ctypes.data] * 3)]
        step.t.steps, step.t.mu_products = step.keep[-2], step.keep[-1]
        info = _info(lib, 999)  # unused with counters in memory
        info.grad_scale, info.maximize, info.counters_in_memory = 0.37, 1, 1
        info.counter_dtype, info.product_dtype = DTYPE[np.dtype(counter_dtype)], DTYPE[np.dtype(np.float64)]
        fn = getattr(lib, f"optkern_{algo}_step")
        extra = [byref(c_double(1.0)), 0] if algo == "nadam" else []
        fn(byref(step.t), byref(h), byref(info), *extra)
        py_kw = dict(kw, grad_multiplier=0.37, maximize=True)
        if algo == "nadam":
            py_kw["mu_product"] = mu_p
        getattr(optkern, f"{algo}_step")(pp, grads, *sp, step=steps_p, **py_kw)
        assert steps_c[0] == steps_p[0] == t, (steps_c, steps_p)
        assert_bits(mu_c, mu_p, f"step {t} mu_product")
        for i in range(len(sizes)):
            assert_bits(pc[i], pp[i], f"step {t} params[{i}]")
            for k in range(n_states):
                assert_bits(sc[k][i], sp[k][i], f"step {t} states[{k}][{i}]")
    assert (mu_c[0] < 1.0) == (algo == "nadam")


@pytest.mark.parametrize("master", ["fp32", "split"])
@pytest.mark.parametrize("case", ["adam", "sgd_momentum", "rmsprop_centered_momentum"])
def test_bfloat16_params_with_masters(lib, case, master, rng):
    """bfloat16 params and grads, float32 states and masters (mixed = 1) against master_weights=... in Python."""
    algo, fields = OPT_CASES[case]
    h = _hyper(lib, algo, fields)
    kw = _python_kwargs(algo, fields)
    n_states = _num_states(lib, algo, h)
    sizes = [7, 1000, 33]
    pc = [rng.standard_normal(n).astype(BF16) for n in sizes]
    mc = optkern.init_masters(pc, master)
    sc = _initial_states(algo, fields, n_states, pc, np.float32)
    pp, mp, sp = [p.copy() for p in pc], [m.copy() for m in mc], [[s.copy() for s in lst] for lst in sc]
    for t in range(1, 4):
        grads = [rng.standard_normal(n).astype(BF16) for n in sizes]
        _c_step(lib, algo, h, CStep(lib, pc, grads, sc, masters=mc), t, 1.0)
        _python_step(algo, pp, grads, sp, t, kw, 1.0, master_weights=master, masters=mp)
        for i in range(len(sizes)):
            assert_bits(pc[i], pp[i], f"step {t} params[{i}]")
            assert_bits(mc[i], mp[i], f"step {t} masters[{i}]")
            for k in range(n_states):
                assert_bits(sc[k][i], sp[k][i], f"step {t} states[{k}][{i}]")
    assert any(not np.array_equal(optkern.master_values(p, m, master), p.astype(np.float32))
               for p, m in zip(pc, mc))  # the masters hold more than the bfloat16 params


def _c_arrays(lib, arrays, dtype=None):
    a = _init(lib, Arrays)
    keep = (_numels(arrays), _ptrs(arrays))
    a.dtype = DTYPE[np.dtype(dtype or arrays[0].dtype)]
    a.count, a.numels, a.data = len(arrays), keep[0], keep[1]
    return a, keep


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16, np.float16], ids=lambda d: np.dtype(d).name)
def test_global_norm_matches_python(lib, dtype, rng):
    grads = [(rng.standard_normal(n) * 3).astype(dtype) for n in SIZES]
    a, _keep = _c_arrays(lib, grads)
    for norm_type in (2.0, math.inf):
        out = c_double(-1.0)
        lib.optkern_global_norm(byref(a), norm_type, byref(out))
        want = optkern.global_norm(grads, norm_type)
        assert out.value == want, f"norm {norm_type}: C {out.value!r}, Python {want!r}"
    grads[3][5] = np.nan
    out = c_double(-1.0)
    lib.optkern_global_norm(byref(a), math.inf, byref(out))
    assert math.isnan(out.value)  # NaN propagates through the max-norm


def _bn_args(lib, x, outer, channels, inner, **arrays):
    a = _init(lib, BnArgs)
    a.dtype, a.outer, a.channels, a.inner = DTYPE[x.dtype], outer, channels, inner
    a.x = x.ctypes.data
    for k, v in arrays.items():
        setattr(a, k, None if v is None else v.ctypes.data)
    return a


@pytest.mark.parametrize("layout", ["NCL", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=lambda d: np.dtype(d).name)
def test_batch_norm_matches_python(lib, dtype, layout, rng):
    if layout == "NCL":
        shape, axis, C = (6, 5, 37), 1, 5
        outer, inner = 6, 37
    else:
        shape, axis, C = (3, 4, 5, 6), -1, 6
        outer, inner = 3 * 4 * 5, 1
    pdt = np.float32 if dtype is BF16 else dtype
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.standard_normal(C).astype(pdt), rng.standard_normal(C).astype(pdt)
    rm, rv = rng.standard_normal(C).astype(pdt), (rng.random(C) + 0.5).astype(pdt)
    rm_c, rv_c = rm.copy(), rv.copy()
    y_c = np.empty_like(x)
    mean_c, invstd_c = np.empty(C), np.empty(C)
    a = _bn_args(lib, x, outer, C, inner, out=y_c, weight=w, bias=b, running_mean=rm_c, running_var=rv_c,
                 mean=mean_c, invstd=invstd_c)
    a.eps, a.momentum = 1e-3, 0.2
    lib.optkern_batch_norm_forward_train(byref(a))
    rm_p, rv_p = rm.copy(), rv.copy()
    y_p, mean_p, invstd_p = optkern.batch_norm_forward(x, w, b, rm_p, rv_p, training=True, momentum=0.2, eps=1e-3,
                                                       axis=axis)
    for got, want, what in ((y_c, y_p, "y"), (mean_c, mean_p, "save_mean"), (invstd_c, invstd_p, "save_invstd"),
                            (rm_c, rm_p, "running_mean"), (rv_c, rv_p, "running_var")):
        assert_bits(got, np.asarray(want), what)
    assert not np.array_equal(rm_c, rm)

    dx_c, dw_c, db_c = np.empty_like(x), np.empty_like(w), np.empty_like(w)
    a = _bn_args(lib, x, outer, C, inner, dy=dy, out=dx_c, weight=w, dweight=dw_c, dbias=db_c, mean=mean_c,
                 invstd=invstd_c)
    lib.optkern_batch_norm_backward_train(byref(a))
    dx_p, dw_p, db_p = optkern.batch_norm_backward(dy, x, w, mean_p, invstd_p, training=True, axis=axis)
    for got, want, what in ((dx_c, dx_p, "dx"), (dw_c, dw_p, "dweight"), (db_c, db_p, "dbias")):
        assert_bits(got, np.asarray(want), what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_lbfgs_dots_and_lincomb_match_python(lib, dtype, rng):
    n = 4099
    stored = [rng.standard_normal(n).astype(dtype) for _ in range(9)]
    queries = [rng.standard_normal(n).astype(dtype) for _ in range(3)]
    s, _keep_s = _c_arrays(lib, stored)
    q, _keep_q = _c_arrays(lib, queries)
    out = np.full(len(queries) * len(stored), np.nan)
    lib.optkern_lbfgs_dots(byref(s), byref(q), out.ctypes.data)
    want = np.asarray(_C.lbfgs_dots(stored, queries))
    assert want.shape == (3, 9)
    assert_bits(out.reshape(3, 9), want, "lbfgs_dots")
    np.testing.assert_allclose(out.reshape(3, 9), np.array(queries, np.float64) @ np.array(stored, np.float64).T,
                               rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-3 if dtype == np.float32 else 1e-9)

    coefs = rng.standard_normal(len(stored))
    res_c, res_p = np.full(n, np.nan, dtype), np.full(n, np.nan, dtype)
    lib.optkern_lbfgs_lincomb(byref(s), coefs.ctypes.data, res_c.ctypes.data)
    _C.lbfgs_lincomb(stored, list(coefs), res_p)
    assert_bits(res_c, res_p, "lbfgs_lincomb")
    # numels of length 1 (the header allows it): every vector has numels[0] elements
    one = (c_int64 * 1)(n)
    s.numels = one
    res_1 = np.full(n, np.nan, dtype)
    lib.optkern_lbfgs_lincomb(byref(s), coefs.ctypes.data, res_1.ctypes.data)
    assert_bits(res_1, res_p, "lbfgs_lincomb with numels of length 1")


def _pairs(rng, k, n, dtype):
    """k curvature pairs (s, y = D s + small noise, D in [0.5, 2]): s.y > 0."""
    d = rng.uniform(0.5, 2.0, n)
    S = [rng.standard_normal(n) for _ in range(k)]
    Y = [d * s + 0.01 * rng.standard_normal(n) for s in S]
    return [s.astype(dtype) for s in S], [y.astype(dtype) for y in Y]


def _two_loop(S, Y, g):
    """The two-loop recursion (Nocedal & Wright, Algorithm 7.4) in float64 NumPy: -H g."""
    S, Y, q = [s.astype(np.float64) for s in S], [y.astype(np.float64) for y in Y], g.astype(np.float64)
    rho = [1.0 / (s @ y) for s, y in zip(S, Y)]
    alpha = [0.0] * len(S)
    for i in reversed(range(len(S))):
        alpha[i] = rho[i] * (S[i] @ q)
        q = q - alpha[i] * Y[i]
    r = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]) * q
    for i in range(len(S)):
        beta = rho[i] * (Y[i] @ r)
        r = r + (alpha[i] - beta) * S[i]
    return -r


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(b))


def _c_direction(lib, S, Y, g, n):
    s, _keep_s = _c_arrays(lib, S, g.dtype) if S else _c_arrays(lib, [g], g.dtype)
    y, _keep_y = _c_arrays(lib, Y, g.dtype) if Y else _c_arrays(lib, [g], g.dtype)
    if not S:  # k = 0: numels[0] still gives the length
        s.count = y.count = 0
    out = np.full(n, np.nan, g.dtype)
    slope = c_double(np.nan)
    lib.optkern_lbfgs_direction(byref(s), byref(y), g.ctypes.data, out.ctypes.data, byref(slope))
    return out, slope.value


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("k,history", [(0, 5), (1, 5), (5, 5), (8, 5), (31, 31)])
def test_lbfgs_direction_matches_history(lib, k, history, dtype, rng):
    """optkern_lbfgs_direction of the stored pairs (oldest first) against LBFGSHistory.direction after the same
    pushes (with a ring buffer that wrapped when k > history), and against a float64 two-loop recursion."""
    n = 1000
    S, Y = _pairs(rng, k, n, dtype)
    hist = optkern.LBFGSHistory(n, history_size=history, dtype=dtype)
    for s, y in zip(S, Y):
        assert hist.push(s, y)
    S, Y = S[-history:] if k else [], Y[-history:] if k else []
    assert len(hist) == len(S)
    g = rng.standard_normal(n).astype(dtype)
    d_c, slope_c = _c_direction(lib, S, Y, g, n)
    d_p, slope_p = hist.direction_and_slope(g)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    assert _rel(d_c, d_p) <= rtol, f"C vs LBFGSHistory.direction: relative {_rel(d_c, d_p):.3g}"
    assert abs(slope_c - slope_p) <= rtol * abs(slope_p), (slope_c, slope_p)
    if not S:
        assert_bits(d_c, -g, "k = 0: -g")
        return
    ref = _two_loop(S, Y, g)
    assert _rel(d_c, ref) <= (1e-10 if dtype == np.float64 else 1e-4), f"vs the two-loop: {_rel(d_c, ref):.3g}"
    assert slope_c < 0  # a descent direction
    gd = float(g.astype(np.float64) @ d_c.astype(np.float64))
    assert abs(slope_c - gd) <= (1e-10 if dtype == np.float64 else 1e-4) * abs(slope_c), (slope_c, gd)


def test_lbfgs_direction_limits(lib, once, rng):
    """k = 32 pairs is refused ([g, S, Y] must fit one lincomb of 64 vectors: k <= 31, as optkern.h says), and a
    pair with s.y <= 0 (not a curvature pair: the direction would not descend) is refused; out is not written."""
    n = 64
    g = rng.standard_normal(n)
    for S, Y, needle in [(*_pairs(rng, 32, n, np.float64), "s->count"),
                         ([rng.standard_normal(n)], None, "s.y")]:
        if Y is None:
            Y = [-S[0]]  # s.y < 0
        s, _ks = _c_arrays(lib, S, g.dtype)
        y, _ky = _c_arrays(lib, Y, g.dtype)
        out = np.full(n, 7.0)
        slope = c_double(np.nan)
        with pytest.raises(OptkernError) as e:
            lib.optkern_lbfgs_direction(byref(s), byref(y), g.ctypes.data, out.ctypes.data, byref(slope))
        assert e.value.status == INVALID and needle in e.value.message, e.value
        assert (out == 7.0).all()


def test_statuses_raised_from_ctypes(lib, once, rng):
    """A bad call's status as the error's code, its message naming the argument, nothing written."""
    p = [rng.standard_normal(n).astype(np.float32) for n in (5, 7, 3)]
    g = [rng.standard_normal(n).astype(np.float32) for n in (5, 7, 3)]
    st = [[np.zeros(a.size, np.float32) for a in p] for _ in range(2)]
    before = [a.copy() for a in p + st[0] + st[1]]
    h = _hyper(lib, "adam", {})
    step = CStep(lib, p, g, st)
    info = _info(lib, 1)

    def expect(code, needle, fn, *args):
        with pytest.raises(OptkernError) as e:
            fn(*args)
        assert (e.value.status, e.value.name) == (code, STATUS[code]) and needle in e.value.message, e.value
        for a, b in zip(p + st[0] + st[1], before):
            assert_bits(a, b, "written by a failed call")

    step.t.count = -1
    expect(INVALID, "tensors->count", lib.optkern_adam_step, byref(step.t), byref(h), byref(info))
    step.t.count = 3
    buf = np.zeros(4 * 3 + 4, np.uint8)
    step.keep[1][2] = buf.ctypes.data + 1  # params[2] at an odd address
    expect(INVALID, "params[2]", lib.optkern_adam_step, byref(step.t), byref(h), byref(info))
    step.keep[1][2] = p[2].ctypes.data
    h.lr = -1.0
    expect(INVALID, "lr", lib.optkern_adam_step, byref(step.t), byref(h), byref(info))
    h.lr = 1e-3
    h.struct_size += 8
    expect(INVALID, "hyper->struct_size", lib.optkern_adam_step, byref(step.t), byref(h), byref(info))
    h.struct_size -= 8
    if lib.optkern_cpu_best_isa() != b"avx512":
        expect(UNSUPPORTED, "avx512", lib.optkern_set_cpu_isa, b"avx512")
    expect(INVALID, "isa", lib.optkern_set_cpu_isa, b"sse2")
    step.t.device = 1  # OPTKERN_DEVICE_CUDA with host pointers
    if lib.optkern_cuda_built() and lib.optkern_cuda_available():
        expect(INVALID, "params[0]", lib.optkern_adam_step, byref(step.t), byref(h), byref(info))
    else:
        expect(UNSUPPORTED, "OPTKERN_DEVICE_CUDA", lib.optkern_adam_step, byref(step.t), byref(h), byref(info))
    step.t.device = 0
    assert lib.optkern_adam_step(byref(step.t), byref(h), byref(info)) == OK  # a good call after the bad ones
    assert not np.array_equal(p[0], before[0])
    # OPTKERN_CUDA_ERROR and OPTKERN_INTERNAL_ERROR need a failing GPU or allocation: not provoked here
