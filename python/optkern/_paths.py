"""Where optkern's C library lives: liboptkern, its header and its CMake / pkg-config files.

The wheel ships them inside the package directory::

    optkern/lib/liboptkern.so            (and liboptkern_core.so, the C++ core it shares with optkern._C)
    optkern/include/optkern/optkern.h
    optkern/lib/cmake/optkern/           optkernConfig.cmake: find_package(optkern CONFIG), target optkern::optkern
    optkern/lib/pkgconfig/optkern.pc

These functions return those paths (strings), or raise RuntimeError when the files are not there (a source
checkout that was built but not installed into ``python/``).  ``python -m optkern --cmake-dir`` etc. print them.
Only the standard library is used here: ``import optkern`` still needs nothing but NumPy.
"""

from __future__ import annotations

import os
import sys

__all__ = ["cmake_dir", "include_dir", "lib_dir", "library_path", "pkgconfig_dir"]

_PKG = os.path.dirname(os.path.abspath(__file__))
_LIB_NAME = {"darwin": "liboptkern.dylib", "win32": "optkern.dll"}.get(sys.platform, "liboptkern.so")


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise RuntimeError(
            f"optkern: {what} not found at {path}. The C library (liboptkern, optkern/optkern.h, the CMake and "
            f"pkg-config files) is installed by the wheel inside the package directory; a source checkout must "
            f"install its build there first: `cmake -S . -B build -DOPTKERN_WHEEL_LAYOUT=ON && cmake --build build "
            f"&& cmake --install build --prefix python`")
    return path


def lib_dir() -> str:
    """The directory holding liboptkern (``optkern/lib``): for ``-L`` and the run-time search path."""
    library_path()
    return os.path.join(_PKG, "lib")


def library_path() -> str:
    """The path of liboptkern itself (``optkern/lib/liboptkern.so``), e.g. for ``ctypes.CDLL``."""
    return _require(os.path.join(_PKG, "lib", _LIB_NAME), "the C library " + _LIB_NAME)


def include_dir() -> str:
    """The directory to put on the include path (``-I``) for ``#include <optkern/optkern.h>``."""
    inc = os.path.join(_PKG, "include")
    _require(os.path.join(inc, "optkern", "optkern.h"), "the C header optkern/optkern.h")
    return inc


def cmake_dir() -> str:
    """The CMake package directory: ``-Doptkern_DIR=...`` for ``find_package(optkern CONFIG)``."""
    d = os.path.join(_PKG, "lib", "cmake", "optkern")
    _require(os.path.join(d, "optkernConfig.cmake"), "the CMake package file optkernConfig.cmake")
    return d


def pkgconfig_dir() -> str:
    """The directory holding ``optkern.pc``: add it to ``PKG_CONFIG_PATH`` for ``pkg-config optkern``."""
    d = os.path.join(_PKG, "lib", "pkgconfig")
    _require(os.path.join(d, "optkern.pc"), "the pkg-config file optkern.pc")
    return d
