"""The Celery classes of the ``pgbroker://`` result backend.

:class:`PgBrokerBackend` is a key-value backend in the shape of Celery's
Redis one (``BaseKeyValueStoreBackend`` + ``AsyncBackendMixin`` + a
``ResultConsumer``): the keys and encoded metas are Celery's own, the store
is ``task_results`` (:mod:`.store`), and waiting is pushed (:mod:`.waiting`).
What differs from Celery's generic key-value code, and why:

- storing a result is one statement that also refuses to overwrite a
  SUCCESS and notifies the waiters (Celery reads the old meta first: two
  round trips);
- a chord's header task stores its result and counts its part in one
  statement (``pg_broker_chord_part_stored``), where Celery stores, then
  calls ``on_chord_part_return``: one round trip of the worker, not two;
- chords count their parts in SQL once per header task and index
  (``pg_broker_chord_part_returned``), so a header task delivered twice (at
  least once delivery, acks late) counts once, and the worker that counts the
  last part holds the chord while it sends the callback: if it dies first, a
  redelivered part takes over once the hold expires, as with Celery's Redis
  backend; a finished chord ignores late copies of its parts. The header is
  only read (``GroupResult.restore`` and the join) by that last worker.
"""

from __future__ import annotations

from uuid import uuid4

from celery import states
from celery.backends.asynchronous import (
    AsyncBackendMixin,
    BaseResultConsumer,
    _waiting_on,
    greenletDrainer,
)
from celery.backends.base import BaseKeyValueStoreBackend, _create_chord_error_with_cause
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, ResultSet, allow_join_result
from celery.utils.log import get_logger
from kombu.utils.encoding import bytes_to_str, ensure_bytes

from pg_broker.database import DatabaseUnavailable
from pg_broker.transport.options import flag
from pg_broker.urls import SCHEME, libpq_url, masked_url

from .store import CONNECTION_ERRORS, shared_store
from .waiting import listener_of

logger = get_logger(__name__)

# result_backend_transport_options["synchronous_commit"]: see pg_broker.results.
DEFAULT_SYNCHRONOUS_COMMIT = "off"
# How long the worker that counted a chord's last part holds it while it joins
# the header and sends the callback, at least (Celery's Redis backend: twice
# result_chord_join_timeout, at least 5 s).
MIN_CHORD_CLAIM = 5.0


def _key(key: bytes | str) -> str:
    return bytes_to_str(key)


class ResultConsumer(BaseResultConsumer):
    """One per backend object (so per thread): tells the process's
    :class:`~.waiting.ResultListener` what it waits for, and takes the results
    it hands out."""

    def consume_from(self, task_id) -> None:
        self.backend.listener.want(self, [self.backend.task_key(task_id)])

    def cancel_for(self, task_id) -> None:
        self.backend.listener.cancel(self, self.backend.task_key(task_id))

    def on_wait_for_pending(self, result, **kwargs) -> None:
        if isinstance(result, ResultSet):
            ids = [node.id for node in result.results if not isinstance(node, ResultSet)]
        else:
            ids = [result.id]
        self.backend.listener.check(self, [self.backend.task_key(i) for i in ids])

    def drain_events(self, timeout=None) -> None:
        self.backend.listener.drain(timeout)

    def deliver(self, key: str, value: bytes) -> None:
        self.on_state_change(self.backend.decode_result(value), None)

    def on_state_change(self, meta, message) -> None:
        """Celery's, without the ``sleep(0)`` it ends with under the default
        (threads) drainer. That yield is for eventlet's and gevent's drainers
        (their other greenlets), kept for them; with threads it hands the CPU
        away once per result: a chord's last part joining 100 results slept
        100 times, 0.3-2 ms each on this busy 2-core machine, most of the join
        (bench.roundtrip --chord), and a get() once on its way out."""
        if isinstance(self.drainer, greenletDrainer):
            super().on_state_change(meta, message)
        else:
            self._settle(meta)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def _settle(self, meta) -> None:
        """What Celery's on_state_change does before its sleep(0)."""
        if self.on_message:
            self.on_message(meta)
        if meta["status"] not in states.READY_STATES:
            return
        task_id = meta["task_id"]
        results = _waiting_on(self._pending_results, task_id)
        if not results:  # buffered: the result may be added to the pending ones after this
            self._pending_messages.put(task_id, meta)
        for result in results:
            result._maybe_set_cache(meta)
            bucket = self.buckets.pop(result, None)
            if bucket is not None:
                bucket.append(result)


class PgBrokerBackend(BaseKeyValueStoreBackend, AsyncBackendMixin):
    """``result_backend = "pgbroker://user:pass@host/db"``: results in PostgreSQL.

    ``pgbroker://`` alone is the broker's database (``PG_BROKER_URL``,
    ``DATABASE_URL`` or the embedded server); libpq parameters in the URL
    pass through. Options (``result_backend_transport_options``):
    ``synchronous_commit`` (``"off"``) for the result writes, see
    :mod:`pg_broker.results`; ``notified_values`` (True): take a result from
    the notification that announces it (no read); False reads every result
    from its row, for a database where roles that must not forge results can
    run SQL (any session can NOTIFY, as any Redis client can PUBLISH).
    """

    ResultConsumer = ResultConsumer

    supports_native_join = True
    # Expired results are invisible at once; their rows are deleted by
    # cleanup() (Celery's daily celery.backend_cleanup under beat), by the
    # tasks app's retention and by `pg-broker retention`.
    supports_autoexpire = False
    supports_result_compression = True  # bytea keeps any bytes
    supports_failure_expires = True
    implements_incr = True

    def __init__(self, app=None, url: str | None = None, **kwargs) -> None:
        super().__init__(app=app, url=url, **kwargs)
        conf = self.app.conf
        options = conf.get("result_backend_transport_options") or {}
        self.url = url or f"{SCHEME}://"
        mode = options.get("synchronous_commit", DEFAULT_SYNCHRONOUS_COMMIT)
        self.synchronous_commit = None if mode is None else str(mode)
        self.notified_values = flag(options.get("notified_values", True))
        failure_expires = conf.get("result_failure_expires")
        self.failure_expires = (self.expires if failure_expires is None
                                else self.prepare_expires(failure_expires))
        self.connection_errors = CONNECTION_ERRORS + (DatabaseUnavailable,)
        # Header parts counted with their result, for on_chord_part_return:
        # part -> (claimer, (parts, claimed, size)). Celery keeps a backend
        # object per thread, so a part is taken by the thread that counted it.
        self._parts_counted: dict[str, tuple[str, tuple[int, bool, int | None]]] = {}
        self._conninfo: str | None = None
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages,
        )

    @property
    def store(self):
        """This process's store for the backend's database (connects on first use)."""
        if self._conninfo is None:
            self._conninfo = libpq_url(self.url)
        return shared_store(self._conninfo, self.synchronous_commit)

    @property
    def listener(self):
        listener = listener_of(self.store)
        listener.trust_carried(self.notified_values)
        return listener

    def as_uri(self, include_password: bool = False) -> str:
        return self.url if include_password else masked_url(self.url)

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        return isinstance(exc, self.connection_errors)

    def task_key(self, task_id) -> str:
        return _key(self.get_key_for_task(task_id))

    def _expires_for(self, state: str | None) -> float | None:
        expires = self.failure_expires if state == states.FAILURE else self.expires
        return expires or None

    # The key-value interface -------------------------------------------------

    def get(self, key):
        return self.store.get(_key(key))

    def mget(self, keys):
        keys = [_key(key) for key in keys]
        found = self.store.mget(keys)
        return [found.get(key) for key in keys]

    def set(self, key, value) -> None:
        self._set_with_state(key, value, None)

    def _set_with_state(self, key, value, state) -> None:
        self.store.set(_key(key), ensure_bytes(value), state, self._expires_for(state))

    def delete(self, key) -> None:
        self.store.delete(_key(key))

    def incr(self, key) -> int:
        return self.store.incr(_key(key))

    def expire(self, key, value) -> None:
        self.store.expire(_key(key), value or None)

    def _store_result(self, task_id, result, state, traceback=None, request=None,
                      chord_part: tuple | None = None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback,
                                     request=request)
        meta["task_id"] = bytes_to_str(task_id)
        key, value = self.task_key(task_id), ensure_bytes(self.encode(meta))
        if chord_part is None:
            self.store.set(key, value, state, self._expires_for(state), keep_success=True)
        else:  # see mark_as_done
            chord, part, claimer, claim, chord_expires = chord_part
            self._parts_counted[part] = (claimer, self.store.chord_part_stored(
                key, value, state, self._expires_for(state), chord, part, claimer, claim,
                chord_expires))
        return result

    def mark_as_done(self, task_id, result, request=None, store_result=True,
                     state=states.SUCCESS) -> None:
        """Celery's, but a chord's header task stores its result and counts its
        part in one statement (migrations/core/202), not one each."""
        if (not store_result or request is None or not request.chord or not request.group
                or not request.id or request.ignore_result):
            super().mark_as_done(task_id, result, request, store_result, state)
            return
        chord, part, claim, chord_expires = self._chord_part(request)
        self.store_result(task_id, result, state, request=request,
                          chord_part=(chord, part, uuid4().hex, claim, chord_expires))
        self.on_chord_part_return(request, state, result)

    def forget(self, task_id) -> None:
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def cleanup(self) -> None:
        """Celery's ``celery.backend_cleanup``: delete expired results."""
        self.store.cleanup()

    # Chords ----------------------------------------------------------------

    def set_chord_size(self, group_id, chord_size) -> None:
        self.store.chord_size(_key(self.get_key_for_chord(group_id)), chord_size,
                              self.chord_expires or None)

    def _chord_part(self, request) -> tuple[str, str, float, float | None]:
        """(the chord's key, this header task's part, how long the worker
        counting the last part holds the chord, the chord's expiry)."""
        join_timeout = self.app.conf.result_chord_join_timeout
        return (_key(self.get_key_for_chord(request.group)),
                f"{request.id}:{request.group_index}",
                max(MIN_CHORD_CLAIM, (join_timeout or 5.0) * 2),
                self.chord_expires or None)

    def on_chord_part_return(self, request, state, result, **kwargs) -> None:
        app = self.app
        gid, tid = request.group, request.id
        if not gid or not tid:
            return
        key, part, claim, expires = self._chord_part(request)
        join_timeout = app.conf.result_chord_join_timeout
        counted = self._parts_counted.pop(part, None)  # with its result (mark_as_done)
        if counted is not None:
            claimer, (parts, claimed, size) = counted
        else:
            claimer = uuid4().hex
            parts, claimed, size = self.store.chord_part_returned(
                key, part, None, claimer, claim, expires)
        deps = None
        if size is None:  # applied without set_chord_size: the header says how many
            deps = self._restore_header(request, gid)
            if deps is None:
                return
            parts, claimed, size = self.store.chord_part_returned(
                key, part, len(deps), claimer, claim, expires)
        if self._chord_result_expires != (self.expires or 0):
            # The last part joins every header result: keep them until then.
            self.expire(self.get_key_for_task(tid), self._chord_result_expires)
        if not claimed:
            if parts > size:
                logger.warning("Chord %r counted %d parts, more than its %d", gid, parts, size)
            return
        deps = deps or self._restore_header(request, gid)
        if deps is None:
            return
        header = self._header_results(key, deps)  # None: Celery's join (which waits)
        callback = maybe_signature(request.chord, app=app)
        try:
            if header is not None:
                values = self._header_values(header)
            else:
                join = deps.join_native if deps.supports_native_join else deps.join
                with allow_join_result():
                    values = join(timeout=join_timeout, propagate=True)
        except Exception as exc:  # a header task failed, or the join timed out
            if header is not None:
                culprit = next((task_id for task_id, meta in header
                                if meta["status"] in states.PROPAGATE_STATES), None)
            else:
                culprit = next((dep.id for dep in deps._failed_join_report()), None)
            reason = repr(exc) if culprit is None else f"Dependency {culprit} raised {exc!r}"
            logger.exception("Chord %r raised: %r", gid, reason)
            self.chord_error_from_stack(
                callback, _create_chord_error_with_cause(message=reason, original_exc=exc))
        else:
            try:
                app.amqp._retry_publish(callback.delay, values)
            except Exception as exc:
                logger.exception("Chord %r raised: %r", gid, exc)
                self.chord_error_from_stack(callback, _create_chord_error_with_cause(
                    message=f"Callback error: {exc!r}", original_exc=exc))
        finally:
            self.store.chord_done(key)
            if self._chord_result_expires != (self.expires or 0):
                for dep in deps.results:
                    self.expire(self.get_key_for_task(dep.id), self.expires)

    def _header_results(self, key: str, deps: GroupResult) -> list[tuple[str, dict]] | None:
        """The chord's header results in header order, (task id, meta), read
        in one statement from its counted parts, as Celery's Redis backend
        reads its chord's list: no join (a LISTEN per header result, a read
        and Celery's hand-out of each). None when the header is not flat (a
        group nested in it: Celery's join gives its nested shape) or a result
        is missing (expired, or counted without its result)."""
        if any(isinstance(dep, ResultSet) for dep in deps.results):
            return None
        found = {part.rpartition(":")[0]: value for part, value in
                 self.store.chord_header(key, _key(self.task_keyprefix))}
        values = [found.get(dep.id) for dep in deps.results]
        if any(value is None for value in values):
            return None
        return [(dep.id, self.decode_result(value)) for dep, value in zip(deps.results, values, strict=True)]

    @staticmethod
    def _header_values(header: list[tuple[str, dict]]) -> list:
        """The header's return values; the exception of the first that failed
        (or was revoked) raised, as Celery's join propagates it."""
        for task_id, meta in header:
            if meta["status"] in states.PROPAGATE_STATES:
                error = meta["result"]
                raise error if isinstance(error, Exception) else ChordError(
                    f"Dependency {task_id} raised {error!r}")
        return [meta["result"] for _, meta in header]

    def _restore_header(self, request, gid) -> GroupResult | None:
        """The chord's header as saved by apply_chord; None (after failing the
        chord) when it cannot be read."""
        try:
            deps = GroupResult.restore(gid, backend=self)
            if deps is None:
                raise ChordError(f"GroupResult {gid} no longer exists")
        except Exception as exc:
            callback = maybe_signature(request.chord, app=self.app)
            logger.exception("Chord %r raised: %r", gid, exc)
            self.chord_error_from_stack(
                callback, exc if isinstance(exc, ChordError)
                else ChordError(f"Cannot restore group: {exc!r}"))
            return None
        return deps

    def __reduce__(self, args=(), kwargs=None):
        return super().__reduce__(args, dict(kwargs or {}, url=self.url))
