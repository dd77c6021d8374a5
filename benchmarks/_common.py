"""Helpers of the benchmark scripts: honest timings with GPU work included
(:func:`cuda_sync`, :func:`clock`) and :class:`Report`, which runs a script's
sections and prints its figures and PASS/FAIL checks as they come and again
in a summary."""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable, Sequence


def cuda_sync() -> None:
    """Wait for queued GPU work (a no-op without CUDA), so timings are honest."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)`` with GPU work finished on both ends."""
    cuda_sync()
    t0 = time.perf_counter()
    out = fn()
    cuda_sync()
    return out, time.perf_counter() - t0


class Report:
    """Figures and checks, printed as they come and again in the summary.

    ``optional``: packages whose absence skips a section instead of breaking it."""

    def __init__(self, optional: Sequence[str] = ()) -> None:
        self.optional = tuple(optional)
        self.figures: list[tuple[str, str, str]] = []
        self.checks: list[tuple[str, bool, str]] = []
        self.broken: list[str] = []
        self.current = ""

    def fig(self, name: str, value: float | str, unit: str = "") -> None:
        if isinstance(value, float):
            text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        else:
            text = f"{value:,}" if isinstance(value, int) else value
        text = f"{text} {unit}".strip()
        print(f"  {name:<44} {text}", flush=True)
        self.figures.append((self.current, name, text))

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        self.checks.append((name, ok, detail))

    def section(self, title: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one section: its figures, its time; a missing optional package
        skips it, any other error is printed and marks the run broken."""
        self.current = title.split()[0]
        print(f"\n== {title} ==", flush=True)
        t0 = time.perf_counter()
        try:
            return fn(self, *args)
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in self.optional:
                print(f"  skipped: {e}")
            else:
                traceback.print_exc()
                self.broken.append(title)
        finally:
            print(f"  [{title}: {time.perf_counter() - t0:.1f} s]", flush=True)
        return None

    def summary(self, title: str, total: float) -> int:
        """Print every figure and check again; the exit status (1: a check failed or a section broke)."""
        print(f"\n== {title} ==")
        for sec, name, text in self.figures:
            print(f"  {sec:<3} {name:<48} {text}")
        for name, ok, detail in self.checks:
            print(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}")
        for title in self.broken:
            print(f"  BROKEN section {title} (traceback above)")
        print(f"  total {total:.0f} s")
        return 1 if self.broken or not all(ok for _, ok, _ in self.checks) else 0
