"""A stage drained batch after batch in the benchmark's own process, under pyinstrument if it is installed."""

from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

from bench import OUT_DIR


def profiled_drain(runner, stage: str, counted: str = "claimed") -> tuple[float, Path | None]:
    """Run ``stage`` batch after batch until nothing is claimed, under pyinstrument if installed.

    Returns (rows per second, where the text profile was written or None). ``counted`` is the
    BatchReport figure to count (``claimed`` for database stages, ``done`` for gateway stages).
    """
    sink = logger.add(OUT_DIR / f"profile-{stage}.log", level="INFO")  # the daemon logs at INFO too
    try:
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None  # noqa: N806 - a class, or None
    profiler = Profiler(interval=0.001) if Profiler else None
    rows = 0
    started = time.perf_counter()
    if profiler:
        profiler.start()
    try:
        while True:
            report = runner.run_stage(stage)
            rows += getattr(report, counted)
            if not report.claimed:
                break
    finally:
        elapsed = time.perf_counter() - started
        if profiler:
            profiler.stop()
        logger.remove(sink)
    out = None
    if profiler:
        out = OUT_DIR / f"profile-{stage}.txt"
        out.write_text(profiler.output_text(unicode=False, color=False, show_all=False), encoding="utf-8")
        (OUT_DIR / f"profile-{stage}.html").write_text(profiler.output_html(), encoding="utf-8")
    return rows / elapsed, out
