"""A Flower-like event monitor, run as its own process: ``python -m bench.monitor``.

It consumes the cluster's events into a ``celery.events.State``, as Flower's
event thread does, and keeps the number of events received in the file named
by ``BENCH_MONITOR_FILE`` (rewritten every 0.1 s), which exists from the moment
the receiver is consuming. A process of its own, like Flower, so it never
competes with the harness's producer for the GIL.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from bench.app import BROKER_VARIABLE, _options_from_env, make_app

COUNT_FILE_VARIABLE = "BENCH_MONITOR_FILE"


def main() -> None:
    app = make_app(os.environ[BROKER_VARIABLE], _options_from_env())
    count_file = Path(os.environ[COUNT_FILE_VARIABLE])
    state = app.events.State()
    received = 0
    consuming = threading.Event()

    def on_event(event: dict) -> None:
        nonlocal received
        received += 1
        state.event(event)

    def report() -> None:
        consuming.wait()
        while True:
            scratch = count_file.with_suffix(".tmp")
            scratch.write_text(str(received))
            scratch.replace(count_file)
            time.sleep(0.1)

    threading.Thread(target=report, daemon=True).start()
    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        original_ready = receiver.on_consume_ready

        def consume_ready(*args, **kwargs):
            original_ready(*args, **kwargs)
            consuming.set()

        receiver.on_consume_ready = consume_ready
        receiver.capture(limit=None, timeout=None, wakeup=False)


if __name__ == "__main__":
    main()
