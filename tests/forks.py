"""Running code in a forked child of the test process (``os.fork``), for the
fork-safety tests of pg_broker/forking.py."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def in_child(work: Callable[[], object]) -> object:
    """Fork; the child runs ``work()``, sends its result back (JSON) and
    exits at once (``os._exit``: no test machinery runs in the child)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            os.write(write, json.dumps(work()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as reply:
        text = reply.read()
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return json.loads(text)
