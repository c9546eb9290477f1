"""CurveZMQ helpers and the loopback-bind rule.

Keys are the Z85 text keys of ZeroMQ (40 characters). Certificates are the files
``zmq.auth.create_certificates`` writes: ``NAME.key`` (public only, safe to share) and
``NAME.key_secret`` (public + secret, keep private). A server's allow list is a directory of
client ``.key`` files.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InvalidArgumentError

KeyPair = tuple[bytes, bytes]


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1; brackets and case ignored)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
