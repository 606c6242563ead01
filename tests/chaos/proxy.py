"""A TCP proxy that can stop forwarding without closing anything.

Workers reach the database through it. :meth:`Proxy.stall` stops moving bytes
in both directions while every socket stays open: each side's kernel still
acknowledges what it is sent, but no reply ever comes — the silent hang of a
stuck middlebox or a server that stopped answering, which TCP keepalives do
not see (the peer's kernel answers them). New connections are accepted and
get no reply either. :meth:`Proxy.resume` moves the bytes held back, as a
network that heals does. :meth:`Proxy.reset` closes every connection at once
instead (a crashed middlebox: the clients see a reset).
"""

from __future__ import annotations

import asyncio
import threading

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .servers import free_port

CHUNK = 65536


class Proxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target`` (a port), or to the
    unix socket ``target`` (a path), from a thread of its own."""

    def __init__(self, target: int | str) -> None:
        self.target = target
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)

    @classmethod
    def in_front_of(cls, database_url: str) -> tuple[Proxy, str]:
        """A started proxy to the server of ``database_url`` (TCP or unix
        socket), and the URL of the same database through it."""
        params = conninfo_to_dict(database_url)
        host, port = params.get("host", ""), int(params.get("port") or 5432)
        proxy = cls(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else port).start()
        return proxy, make_conninfo(database_url, host="127.0.0.1", port=proxy.port)

    def start(self) -> Proxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stall(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def reset(self) -> None:
        def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
        self._loop.call_soon_threadsafe(close_all)

    def close(self) -> None:
        self.reset()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # The loop -------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # stalled: the client's startup packet waits
        try:
            if isinstance(self.target, int):
                server_reader, server_writer = await asyncio.open_connection(
                    "127.0.0.1", self.target)
            else:
                server_reader, server_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, server_writer}
        await asyncio.gather(
            self._pump(client_reader, server_writer),
            self._pump(server_reader, client_writer),
            return_exceptions=True,
        )
        for writer in (client_writer, server_writer):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # what was read as the stall began waits too
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass  # the other side reset: end both
        finally:
            writer.transport.abort()
