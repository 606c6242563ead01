"""Faults, injected and counted: real Celery workers against servers this
suite starts and owns, killed, restarted, cut off and made read-only while
tasks flow, every execution written down in a ledger on another server.

``python -m tests.chaos`` runs every scenario and prints the table of figures
(README, "Reliability"); ``tests/chaos/test_chaos.py`` is the short version
the normal test run includes. The fault tools (:mod:`.servers`, :mod:`.proxy`)
serve the integration tests too.
"""
