"""The benchmarks (bench/README.md): one script a measurement, and what they share, one concept a module.

* ``database``: the throwaway MariaDB a script measures on, a fresh database per measurement, raw SQL;
* ``seed``: rows in the state each stage expects, written fast from MariaDB's sequence tables;
* ``configs``: jobs.yaml's settings, and configurations for a Runner in the benchmark's own process;
* ``emulator_server``: the WeChat Pay emulator in a process of its own, and ``EmulatorProcess``, its client;
  ``unlimited_sandbox``, the in-process one with every limit off;
* ``profiling``: a stage drained in the benchmark's own process, under pyinstrument;
* ``reporting``: the result options, tables, targets, the machine, statistics, and RESULTS.md.

The daemon under test runs as ``testsupport.processes.DaemonProcess``, the acceptance tests' own.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"  # logs, configs, profiles, quick-run results (git-ignored)
