"""``pgbroker://`` known to Kombu, Celery and Flower without ``import pg_broker``.

Kombu 5.7 has no transport entry points: ``kombu.Connection("pgbroker://")``
looks the scheme up in ``kombu.transport.TRANSPORT_ALIASES`` and nowhere else.
The installed ``pg_broker.pth`` (site-packages, read by every interpreter of
that environment at start-up) runs ``import pg_broker``, which calls
:func:`register`: it puts the scheme into that table the moment Kombu's module
is imported — never earlier, so an interpreter that does not use Kombu pays
for this module alone (no Kombu, Celery or psycopg import at start-up).

Where the ``.pth`` is not read (``python -S``, an interpreter whose
site-packages is not this environment's, a zip app), ``import pg_broker``
before creating the Celery app does the same; Kombu's ``No such transport:
pgbroker`` is the symptom. The result backend is also a ``celery.result_backends``
entry point, which Celery reads by itself.
"""

from __future__ import annotations

import sys

# Nothing else imported: this module runs at every interpreter start-up.

SCHEME = "pgbroker"  # as pg_broker.urls.SCHEME (that module imports psycopg)


def _kombu_transport(module) -> None:
    module.TRANSPORT_ALIASES.setdefault(SCHEME, "pg_broker.transport:Transport")


def _celery_backends(module) -> None:
    module.BACKEND_ALIASES.setdefault(SCHEME, "pg_broker.results:PgBrokerBackend")


def _flower_broker(module) -> None:
    from pg_broker.flower import install

    install()


# Module name -> what to do once it has been imported.
_WATCHED = {
    "kombu.transport": _kombu_transport,
    "celery.app.backends": _celery_backends,
    "flower.utils.broker": _flower_broker,
}


class _ThenRegister:
    """A loader that runs the module's own loader, then the registration."""

    def __init__(self, loader, then) -> None:
        self._loader = loader
        self._then = then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._then(module)

    def __getattr__(self, name: str):  # get_data, get_resource_reader, is_package …
        return getattr(self._loader, name)


class _AfterImport:
    """A ``sys.meta_path`` finder that finds nothing itself: for a watched
    module it asks the finders after it and wraps the loader they return."""

    def find_spec(self, name: str, path, target=None):
        if name not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _ThenRegister(spec.loader, _WATCHED.pop(name))
                if not _WATCHED:
                    sys.meta_path.remove(self)
                return spec
        return None


def register() -> None:
    """Register the scheme with Kombu, Celery and Flower: now for those
    already imported, on their import for the others. Idempotent."""
    for name in list(_WATCHED):
        if name in sys.modules:
            _WATCHED.pop(name)(sys.modules[name])
    if _WATCHED and not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
