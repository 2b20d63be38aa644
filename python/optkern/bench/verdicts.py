"""Verdicts of the benchmarks, and the rules that tell a measurement from noise (one place for every suite).

A row's target reads "met" / "NOT met" only when the row is clean.  A row is noisy ("noisy, rerun", no verdict)
when

* its roofline, the in-place add timed just before and just after the row (``roof_before_gbs``,
  ``roof_after_gbs``), moved by more than ``DRIFT_LIMIT`` (of the larger): the machine's background load changed
  while the row ran, so its figures are not comparable with each other;
* a figure is above a physical bound: more than ``PHYSICAL_BOUND_PCT`` of the roofline (optkern's or torch's
  effective GB/s, which count the minimal bytes, cannot beat the add they are measured against by more than timing
  noise), a read-only pass more than ``PHYSICAL_BOUND_PCT`` of its read-only reference, or a read from DRAM faster
  than the add on cache-resident arrays (``roofline_cached_gbs``).

The CUDA suite (:mod:`optkern.bench.cuda`) holds its rows to the device copy through the same ``target`` and
``PHYSICAL_BOUND_PCT``.
"""

from __future__ import annotations

import math

PHYSICAL_BOUND_PCT = 110.0  # above this % of its bound, a figure is noise (or a cache), not a measurement
DRIFT_LIMIT = 0.15  # the roofline before vs after a row, relative to the larger
NOISY = "noisy, rerun"

# (figure key, bound key or None for a percentage, what the message calls it)
_PCT_FIGURES = (("optkern_pct_roofline", "optkern's % of the roofline"),
                ("torch_pct_roofline", "torch's % of the roofline"),
                ("pass1_pct_read", "pass 1's % of the read reference"),
                ("direction_pct_read", "the direction's % of the read reference"))
_READ_FIGURES = (("pass1_gbs", "pass 1 (read-only)"), ("read_best_gbs", "the DRAM read reference"))


def verdict(value: float, threshold: float, *, higher: bool = True, noisy: bool = False) -> str:
    """"met" / "NOT met" for value against threshold (higher or lower is better); "noisy, rerun" when the row is
    noisy, whatever the value."""
    if noisy:
        return NOISY
    if value is None or not math.isfinite(value):
        return "NOT met"
    return "met" if (value >= threshold if higher else value <= threshold) else "NOT met"


def target(what: str, value: float, threshold: float, *, higher: bool = True, noisy: bool = False) -> dict:
    """One target of a row: the "met" key is True / False, or None when noisy."""
    status = verdict(value, threshold, higher=higher, noisy=noisy)
    return {"what": what, "value": value, "threshold": threshold, "status": status,
            "met": None if status == NOISY else status == "met"}


def drift(before: float, after: float) -> float:
    """|before - after| relative to the larger of the two (0 when both are 0)."""
    hi = max(before, after)
    return abs(before - after) / hi if hi > 0 else 0.0


def noise_reasons(row: dict) -> list:
    """Why the row is noisy (empty: it is clean)."""
    why = []
    b, a = row.get("roof_before_gbs"), row.get("roof_after_gbs")
    if b is not None and a is not None and drift(b, a) > DRIFT_LIMIT:
        why.append(f"the roofline moved from {b:.1f} to {a:.1f} GB/s during the row "
                   f"({100 * drift(b, a):.0f}% > {100 * DRIFT_LIMIT:.0f}%)")
    for key, name in _PCT_FIGURES:
        v = row.get(key)
        if v is not None and v > PHYSICAL_BOUND_PCT:
            why.append(f"{name} is {v:.0f}% (> {PHYSICAL_BOUND_PCT:.0f}%)")
    cached = row.get("roofline_cached_gbs")
    if cached:
        for key, name in _READ_FIGURES:
            v = row.get(key)
            if v is not None and v > PHYSICAL_BOUND_PCT / 100 * cached:
                why.append(f"{name} at {v:.1f} GB/s is faster than the add on cache-resident arrays "
                           f"({cached:.1f} GB/s)")
    return why


def judge(row: dict) -> dict:
    """Marks the row clean or noisy (``noisy``, ``noisy_why``) and gives each of its targets its status: a noisy
    row's targets get "noisy, rerun" and ``met`` None.  Targets are dicts with "what", "value" and "met" (the
    verdict computed from the value); returns the row."""
    why = noise_reasons(row)
    row["noisy"], row["noisy_why"] = bool(why), why
    for t in row.get("targets") or []:
        if why:
            t["met"], t["status"] = None, NOISY
        elif t.get("met") is not None:
            t["status"] = "met" if t["met"] else "NOT met"
    return row


def _name(row: dict) -> str:
    n = row.get("n")
    return row["case"] if n is None or f"{n:,}" in row["case"] else f"{row['case']} at n={n:,}"


def summary(rows: list) -> str:
    """The verdict count over the clean rows, and how many rows were noisy."""
    clean = [t for r in rows if not r.get("noisy") for t in (r.get("targets") or []) if t.get("met") is not None]
    noisy = [r for r in rows if r.get("noisy")]
    line = f"targets met: {sum(t['met'] for t in clean)} / {len(clean)} (verdicts over the clean rows only)"
    if noisy:
        line += (f"; {len(noisy)} of {len(rows)} rows noisy, without a verdict: rerun them on a quieter machine "
                 f"({'; '.join(_name(r) for r in noisy)})")
    else:
        line += f"; no noisy rows (of {len(rows)})"
    return line
