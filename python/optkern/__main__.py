"""``python -m optkern``: where the C library is, for build systems (like ``python -m pybind11 --cmakedir``).

    cc prog.c $(python -m optkern --include-dir | sed 's/^/-I/') $(python -m optkern --libs)
    cmake -Doptkern_DIR="$(python -m optkern --cmake-dir)" ...
    PKG_CONFIG_PATH="$(python -m optkern --pkgconfig-dir)" pkg-config --cflags --libs optkern
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from ._paths import cmake_dir, include_dir, lib_dir, pkgconfig_dir


def _libs() -> str:
    d = lib_dir()
    return f"-L{d} -loptkern -Wl,-rpath,{d}"


_ACTIONS = {
    "cmake_dir": cmake_dir,
    "include_dir": include_dir,
    "lib_dir": lib_dir,
    "pkgconfig_dir": pkgconfig_dir,
    "libs": _libs,
    "version": lambda: __version__,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optkern",
                                     description="Print where optkern's C library, header and build files are.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cmake-dir", action="store_true",
                       help="the CMake package directory (-Doptkern_DIR=... for find_package(optkern CONFIG))")
    group.add_argument("--include-dir", action="store_true", help="the include directory (holds optkern/optkern.h)")
    group.add_argument("--lib-dir", action="store_true", help="the directory holding liboptkern")
    group.add_argument("--pkgconfig-dir", action="store_true", help="the directory holding optkern.pc")
    group.add_argument("--libs", action="store_true", help="linker flags: -L<libdir> -loptkern -Wl,-rpath,<libdir>")
    group.add_argument("--version", action="store_true", help="optkern's version")
    args = parser.parse_args(argv)
    chosen = [k for k in _ACTIONS if getattr(args, k)]
    if not chosen:
        parser.print_help()
        return 0
    try:
        print(_ACTIONS[chosen[0]]())
    except RuntimeError as e:
        print(f"python -m optkern: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
