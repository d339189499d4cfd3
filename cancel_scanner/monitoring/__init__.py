"""Monitoring: Prometheus metrics, health checks, the status page, and the watcher that feeds them
(and the alert rules) from one bounded reading of the database on the daemon's own schedule.

metrics.py (the contract's names), snapshot.py (the reading), watch.py (its schedule), page.py
(the HTML), server.py (HTTP on ``monitoring.listen``).
"""
