"""Support shared by the tests and the benchmarks: waiting on a condition, writing the shop's rows.

Not part of the product (setup.cfg does not package it); importable from the repository root,
where pytest and bench/ put it on ``sys.path``.
"""
