"""`cancel-scanner demo`: the whole flow on a fresh SQLite file and the sandbox gateway, in seconds.

No server, no credentials, no jobs.yaml: the demo builds its own configuration
(short intervals, a refund succeeds one second after it is accepted), seeds goods
and orders as the shop's order system would, inserts merchants' cancel requests
as their tools would (four columns, trickled in), and runs the real daemon in
this process until every stage has nothing pending. It then checks what it can
prove (no refund created twice, money moved = refunds SUCCESS, stock and sales
moved by exactly the cancelled quantities) and prints a summary.

The screen is a progress display, not a log: every log record goes to a file
next to the database, and only warnings and errors are echoed above the
progress lines.

plan     the sample plan, decided up front from the seed alone (plan_demo, DEFAULT_ORDERS)
seed     writing the shop's rows and the merchants' requests, as their own systems would
screen   the progress display and where log records go
summary  the closing summary and its self-checks
run      the wiring: configuration, the daemon, the watch loop (run_demo)
"""

from __future__ import annotations

from cancel_scanner.demo.errors import DemoError
from cancel_scanner.demo.plan import DEFAULT_ORDERS, plan_demo
from cancel_scanner.demo.run import run_demo

__all__ = ["DEFAULT_ORDERS", "DemoError", "plan_demo", "run_demo"]
