"""Support shared by the tests and the benchmarks, one concept a module.

* ``mariadb``: a throwaway MariaDB server;
* ``processes``: the command line and the daemon in subprocesses, their logs, their CPU and memory;
* ``shop``: the shop's rows, written as the shop writes them;
* ``waiting``: waiting on a condition with a deadline;
* ``emulator_faults`` and ``bill_faults``: the WeChat Pay emulator's fault injection (its fault hooks,
  ``EmulatorFaults``; ``FaultPlan``; the kinds behind ``Emulator.fail_next`` and ``spoil_next_download``).

Not part of the product (setup.cfg does not package it); importable from the repository root,
where pytest and bench/ put it on ``sys.path``.
"""
