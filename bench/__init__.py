"""Benchmark harness: pgbroker against Redis, RabbitMQ and kombu's SQL transports.

Run it with ``python -m bench --quick`` (a few minutes) or ``python -m bench``
(the full sizes). Every broker runs the same Celery app, task and worker
settings (:mod:`bench.app`); every figure is a median over repeats that
interleave the brokers (A, B, C, A, B, C ...), reported as a ratio against
Redis measured in the same run, because the machines it runs on are shared
and noisy.
"""
