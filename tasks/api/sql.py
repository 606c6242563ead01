"""The API's named statements (``tasks/api/queries.sql``), loaded as the
library loads its own (:func:`pg_broker.queries.load`)."""

from pathlib import Path

from pg_broker.queries import load

statements = load(Path(__file__).with_name("queries.sql"))
