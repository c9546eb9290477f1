"""CurveZMQ helpers, the loopback-bind rule, the access-token rule, and the guard every HTTP door puts before
its handlers.

The access rule (:func:`check_access`, :data:`MIN_TOKEN_CHARS`) is what the console and the MCP server's HTTP
transport check before anything slow starts: a loopback bind needs no token; any other address needs one of at
least :data:`MIN_TOKEN_CHARS` printable characters (given, or generated and printed at start).

The guard (:func:`refuse_browser_request`) is what keeps web pages the operator happens to open from driving
a door through the operator's browser: the web console, the Ray Serve ingress and the Foxglove live view
all apply it. It refuses a ``Host`` that is not this machine's (DNS rebinding) where the door answers
loopback only, an ``Origin`` of another site (a cross-site ``fetch`` or WebSocket), and a ``POST`` that is
not ``application/json`` (a "simple" cross-site form post needs no CORS preflight).

Keys are the Z85 text keys of ZeroMQ (40 characters). Certificates are the files
``zmq.auth.create_certificates`` writes: ``NAME.key`` (public only, safe to share) and
``NAME.key_secret`` (public + secret, keep private). A server's allow list is a directory of
client ``.key`` files.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import Code, InvalidArgumentError, code_info

KeyPair = tuple[bytes, bytes]
#: Shortest access token an HTTP door accepts (the console's, the MCP server's).
MIN_TOKEN_CHARS = 12


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1; brackets and case ignored)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Refusal:
    """Why :func:`refuse_browser_request` refused a request: the error code (:class:`~lisa_agent.errors.Code`)
    and a message; ``status`` is the code's HTTP status."""

    code: str
    message: str

    @property
    def status(self) -> int:
        return code_info(self.code).status


def _host_port(authority: str, scheme: str = "http") -> tuple[str, int | None]:
    """(host name lower-cased without brackets, port or the scheme's default) of ``HOST[:PORT]``."""
    try:
        parts = urlsplit(f"//{authority.strip()}")
        port = parts.port
    except ValueError:
        return "", None
    default = {"http": 80, "ws": 80, "https": 443, "wss": 443}.get(scheme)
    return (parts.hostname or "").lower(), port if port is not None else default


def refuse_browser_request(method: str, host: str | None, origin: str | None, content_type: str | None, *,
                           check_host: bool, hosts: Iterable[str] = (), origins: Iterable[str] = (),
                           json_posts: bool = True) -> Refusal | None:
    """None when a request may go on; else the :class:`Refusal` to answer with.

    Args:
        method, host, origin, content_type: the request's method and its ``Host``, ``Origin`` and
            ``Content-Type`` headers (None when absent).
        check_host: the door answers this machine only (a loopback bind without a token): its ``Host`` must
            be a loopback name or address, or one of ``hosts`` (``"*"``: any), so a page whose name was
            re-pointed at 127.0.0.1 (DNS rebinding) is refused (403 ``forbidden_host``).
        origins: browser origins allowed besides the door's own (``https://app.foxglove.dev``). Any other
            ``Origin``, and ``null``, is refused (403 ``cross_origin``); requests without one (non-browser
            clients) pass.
        json_posts: a ``POST`` must say ``Content-Type: application/json`` (else 415 ``unsupported_media_type``).
    """
    name, port = _host_port(host or "")
    allowed_hosts = {h.strip().strip("[]").lower() for h in hosts}
    if check_host and not (is_loopback_host(name) or name in allowed_hosts or "*" in allowed_hosts):
        return Refusal(Code.FORBIDDEN_HOST, f"host {host!r} is not this machine's loopback address")
    if origin is not None:
        seen = origin.strip().rstrip("/").lower()
        scheme = urlsplit(seen).scheme
        same = seen != "null" and bool(name) and _host_port(urlsplit(seen).netloc, scheme) == (name, port)
        if not same and seen not in {o.strip().rstrip("/").lower() for o in origins}:
            return Refusal(Code.CROSS_ORIGIN, f"requests from pages of another site ({origin[:100]!r}) are refused")
    if json_posts and method.upper() == "POST":
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        if mime != "application/json":
            return Refusal(Code.UNSUPPORTED_MEDIA_TYPE, "send the body as JSON (Content-Type: application/json)")
    return None


def check_listen(host: str, port: int, what: str) -> None:
    """Refuse (:class:`InvalidArgumentError`) a TCP address this machine cannot listen on (not one of its
    addresses, a port already taken) before anything slow starts. ``port`` 0 is any free port."""
    try:
        infos = socket.getaddrinfo(host.strip().strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidArgumentError(f"{what} {host!r} is not an address of this machine: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}") from None


def check_access(host: str, port: int, token: str | None, *, listen: bool = False) -> None:
    """Refuse (:class:`InvalidArgumentError`) a port out of range or a weak token (fewer than
    :data:`MIN_TOKEN_CHARS` printable characters, or spaces); with ``listen``, also an address this machine
    cannot listen on. The console and ``lisa-agent mcp --transport http`` check this before a model loads."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be in [0, 65535]; got {port!r}")
    if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token):
        raise InvalidArgumentError(f"token must be at least {MIN_TOKEN_CHARS} printable characters without spaces")
    if listen:
        check_listen(host, port, "--bind")


def access_token(host: str, port: int, token: str | None) -> str | None:
    """The token an HTTP door on ``host:port`` asks of every request: ``token`` when given, a new random one when
    ``host`` is not loopback (printed for the operator), else None (loopback serves this machine only). Checks
    :func:`check_access` first."""
    check_access(host, port, token)
    if token is None and not is_loopback_host(host):
        return secrets.token_urlsafe(24)
    return token


def is_loopback_endpoint(endpoint: str) -> bool:
    """True when a bind endpoint is reachable only from this machine.

    ``ipc://`` and ``inproc://`` are local; ``tcp://HOST:PORT`` is local when HOST is
    ``localhost`` or a loopback address (127.0.0.0/8, ::1). Wildcards (``*``, ``0.0.0.0``) and
    interface names are not.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    return is_loopback_host(urlsplit(endpoint).hostname or "")


def check_bind(endpoint: str, *, curve: bool, insecure: bool) -> None:
    """Refuse a non-loopback bind without CurveZMQ unless ``insecure`` is set."""
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise InvalidArgumentError(f"bind endpoint {endpoint!r} must start with tcp://, ipc:// or inproc://")
    if is_loopback_endpoint(endpoint) or curve or insecure:
        return
    raise InvalidArgumentError(
        f"refusing to bind {endpoint} without CurveZMQ: anyone on the network could use the model. "
        "Give --curve-secret SERVER.key_secret --curve-allow CLIENT_KEYS_DIR (make keys with "
        "lisa_agent.serving.security.create_keypair), or pass --insecure on a trusted network."
    )


def create_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` into ``directory``; returns both paths."""
    import zmq.auth

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    return Path(public), Path(secret)


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """(public, secret) Z85 keys from a ``.key_secret`` certificate file."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"CurveZMQ certificate {path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except Exception as exc:  # noqa: BLE001 - zmq raises ValueError / OSError variants
        raise InvalidArgumentError(f"cannot read CurveZMQ certificate {path}: {exc}") from None
    if not secret:
        raise InvalidArgumentError(f"{path} holds no secret key: pass the .key_secret file, not the public .key")
    return public, secret


def load_public_key(key: str | bytes | os.PathLike[str]) -> bytes:
    """A Z85 public key given as the key itself (40 chars) or as a certificate file path."""
    if isinstance(key, bytes) and len(key) == 40:
        return key
    if isinstance(key, str) and len(key) == 40 and not Path(key).exists():
        return key.encode("ascii")
    import zmq.auth

    path = Path(os.fsdecode(key))
    if not path.is_file():
        raise InvalidArgumentError(f"CurveZMQ public key {key!r} is neither a 40-char Z85 key nor a file")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgumentError(f"cannot read CurveZMQ certificate {path}: {exc}") from None
    return public


def client_keypair(keys: KeyPair | str | os.PathLike[str]) -> KeyPair:
    """A client's (public, secret) pair, given as a tuple of Z85 keys or a ``.key_secret`` file."""
    if isinstance(keys, tuple):
        public, secret = keys
        return (public.encode("ascii") if isinstance(public, str) else public,
                secret.encode("ascii") if isinstance(secret, str) else secret)
    return load_keypair(keys)


def check_allow_dir(directory: str | os.PathLike[str]) -> Path:
    """The allow-list directory, which must exist and hold at least one ``.key`` file."""
    path = Path(directory)
    if not path.is_dir():
        raise InvalidArgumentError(f"CurveZMQ allow-list {path} is not a directory of client .key files")
    if not any(path.glob("*.key")):
        raise InvalidArgumentError(f"CurveZMQ allow-list {path} holds no .key files: no client could connect")
    return path
