"""optkern's benchmark harness: ``python -m optkern.bench`` (see :mod:`optkern.bench.runner`).

Times every fused optimizer step against torch's best CPU path (fused=True where torch has it, else
foreach=True) and against an in-place add roofline measured in the same run; writes JSON, a PNG and a
markdown table.
"""

from .runner import main, run

__all__ = ["main", "run"]
