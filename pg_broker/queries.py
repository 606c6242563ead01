"""Named SQL statements, loaded from ``sql/queries.sql``.

Every statement the library runs lives in that one file under a
``-- name: <name>`` header followed by a one-line ``--`` description, as in
procrastinate. Code asks for a statement by name: ``queries["reclaim_stale_tasks"]``.
Values are always bind parameters; identifiers never come from user input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

QUERIES_FILE = Path(__file__).with_name("sql") / "queries.sql"
_HEADER = re.compile(r"^-- name: ([a-z0-9_]+)\s*$", re.MULTILINE)


def load(path: Path = QUERIES_FILE) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    headers = list(_HEADER.finditer(text))
    found: dict[str, str] = {}
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        body_lines = text[header.end():end].strip().splitlines()
        if not body_lines or not body_lines[0].startswith("--"):
            raise ValueError(f"query {header.group(1)!r} in {path.name} has no description line")
        body = "\n".join(line for line in body_lines if not line.startswith("--")).strip()
        name = header.group(1)
        if name in found:
            raise ValueError(f"query {name!r} is defined twice in {path.name}")
        found[name] = body.rstrip(";")
    return found


queries: Mapping[str, str] = load()
