"""A gate in front of a WebSocket server that cannot check who connects (foxglove-sdk's has no hook for it).

:class:`WebSocketGate` listens where the server should be reached. For each connection it reads the HTTP
request head (at most :data:`MAX_HEAD_BYTES`, within ``header_timeout_s``), applies the rule every HTTP door
shares (:func:`~lisa_agent.serving.security.refuse_browser_request`: a ``Host`` that is not this machine's on
a loopback gate, an ``Origin`` that is not allowed), answers a refusal with an HTTP error, and otherwise
passes the head and then every byte both ways to the server behind it.

The server behind the gate listens on a random loopback port with TLS and a certificate made for this run
(:func:`loopback_certificate`) that only the gate trusts: a web page that finds that port cannot open a
WebSocket to it (browsers refuse the certificate), so the gate is the only way in for a browser.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Sequence

from ..errors import InvalidArgumentError
from .security import is_loopback_host, refuse_browser_request

log = logging.getLogger("lisa_agent.serving.gate")

#: Longest request head read (bytes): a WebSocket upgrade request is well under 2 KB.
MAX_HEAD_BYTES = 16 * 1024
_REASONS = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}


def loopback_certificate() -> tuple[bytes, bytes]:
    """(certificate, private key), PEM, for ``127.0.0.1`` / ``localhost``: self-signed, new for each call."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lisa-agent loopback")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def reset_connection(transport: asyncio.BaseTransport) -> None:
    """Drop a connection at once (TCP reset): what it still had to send is thrown away. ``abort()`` alone
    leaves the kernel sending that to a peer that reads nothing, holding its buffer for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    abort = getattr(transport, "abort", None)
    if callable(abort):
        abort()
    else:
        transport.close()


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    """(method, lower-cased header name -> value) of an HTTP/1.1 request head."""
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.strip())
    return method, headers


class WebSocketGate:
    """Listen on ``host``:``port`` and pass allowed connections to ``127.0.0.1``:``upstream_port`` (TLS,
    trusting ``upstream_cert``).

    Args:
        upstream_port: the server's loopback port.
        upstream_cert: its certificate (PEM): the only one this gate accepts there.
        host / port: where clients connect (``port`` 0: any free port, :attr:`port` tells which).
        origins: browser origins allowed to connect (``https://app.foxglove.dev``); connections without an
            ``Origin`` (desktop apps, scripts) are allowed, any other origin is refused (403).
        header_timeout_s: a connection that has not sent its request head by then is dropped.
        send_timeout_s: a client (or the server) that takes nothing sent to it for this long is cut off.
    """

    def __init__(self, upstream_port: int, upstream_cert: bytes, *, host: str = "127.0.0.1", port: int = 0,
                 origins: Sequence[str] = (), header_timeout_s: float = 10.0, send_timeout_s: float = 20.0) -> None:
        for name, value in (("header_timeout_s", header_timeout_s), ("send_timeout_s", send_timeout_s)):
            if not value > 0:
                raise InvalidArgumentError(f"{name} must be positive; got {value!r}")
        self.upstream_port = int(upstream_port)
        self.host = host
        self.port = int(port)
        self.origins = tuple(origins)
        self.header_timeout_s = float(header_timeout_s)
        self.send_timeout_s = float(send_timeout_s)
        self._tls = ssl.create_default_context(cadata=upstream_cert.decode("ascii"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    # ------------------------------------------------------------------ running
    def start(self, timeout: float = 30.0) -> WebSocketGate:
        """Listen (from a thread of its own); returns once listening. Raises when the address is unusable."""
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            try:
                self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD_BYTES,
                                                          reuse_address=True)
            except BaseException as exc:
                failure.append(exc)
                started.set()
                return
            self.port = int(self._server.sockets[0].getsockname()[1])
            started.set()
            await self._stopped.wait()
            self._server.close()

        self._thread = threading.Thread(target=lambda: asyncio.run(main()), name="lisa-ws-gate", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f"the gate did not start within {timeout:g} s")
        if failure:
            exc = failure[0]
            raise InvalidArgumentError(f"cannot listen on {self.host}:{self.port}: {exc}") from None
        return self

    def close(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopped.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None

    # ------------------------------------------------------------------ one connection
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._gate(reader, writer)
        except asyncio.CancelledError:  # the gate is closing: drop the connection quietly
            writer.transport.abort()

    async def _gate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()  # slow, silent or oversized: no answer
            return
        method, headers = _headers(head)
        refusal = refuse_browser_request(method, headers.get("host"), headers.get("origin"), None,
                                         check_host=is_loopback_host(self.host), hosts=[self.host],
                                         origins=self.origins, json_posts=False)
        if refusal is not None:
            log.warning("refused a WebSocket connection (Origin %r, Host %r): %s; allow an app's origin with "
                        "--foxglove-origin", headers.get("origin"), headers.get("host"), refusal.message)
            await self._answer(writer, refusal.status, refusal.code + ": " + refusal.message)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port, ssl=self._tls,
                                                                 server_hostname="127.0.0.1")
        except (OSError, ssl.SSLError) as exc:
            await self._answer(writer, 502, f"the live view is not running ({exc})")
            return
        up_writer.write(head)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for side in (writer, up_writer):
                side.transport.abort()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body = (message + "\n").encode()
        writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: text/plain; charset=utf-8"
                     f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        try:
            await asyncio.wait_for(writer.drain(), 5.0)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.transport.abort() if writer.transport.get_write_buffer_size() else writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` to ``writer`` until ``reader`` ends (then end ``writer`` too); a ``writer`` that takes
        nothing for ``send_timeout_s`` (or fails) is aborted, which ends the other direction as well."""
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await asyncio.wait_for(writer.drain(), self.send_timeout_s)
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError, RuntimeError):
            reset_connection(writer.transport)
