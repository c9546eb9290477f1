"""What a model is to every door: the :class:`SegmentBackend` protocol, and :func:`open_backend`, the one
place that chooses an in-process model or a client of a model server.

A backend takes a :class:`~lisa_agent.frames.Frame` (or an HxWx3 uint8 RGB array), a query and
:class:`~lisa_agent.options.QueryOptions`, and returns a :class:`~lisa_agent.result.SegmentationResult`.
The LISA engine (:class:`~lisa_agent.engine.segmenter.LisaSegmenter`) is one, a client of ``lisa-agent
serve`` (:class:`~lisa_agent.serving.client.LisaClient`) another, a reasoner that writes boxes for SAM 2
(:class:`~lisa_agent.reasoner.segmenter.ReasonerSegmenter`: VisionReasoner, Seg-Zero) a third: nothing in the
protocol names LISA's internals. :func:`load_model` chooses between the in-process ones from the checkpoint's
``config.json`` (``model_type`` ``qwen2_5_vl``: a reasoner; anything else: LISA). The doors (the CLI's
commands, the server, the console, the LangChain tool, the ROS node, the bag tool) take any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .config import DEFAULT_MODEL, EngineConfig
from .errors import InvalidArgumentError
from .frames import Frame
from .options import QueryOptions

if TYPE_CHECKING:  # pragma: no cover
    from .result import SegmentationResult

#: Address schemes that name a model server rather than a model.
SERVER_SCHEMES = ("tcp://", "ipc://", "http://", "https://")


@runtime_checkable
class SegmentBackend(Protocol):
    """A model that answers queries about frames (in-process or remote)."""

    def segment(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None = None, *,
                frame_id: str | None = None, mode: str | None = None, max_new_tokens: int | None = None,
                answer: str | None = None, return_logits: bool | None = None) -> SegmentationResult:
        """Answer ``query`` about ``image`` (a :class:`Frame` or an HxWx3 uint8 RGB array) as ``options`` say
        (the defaults when None); the keywords that are not None change single options
        (:meth:`QueryOptions.of`); ``frame_id`` names the frame in the result. The doors pass ``options`` by
        keyword (``segment(frame, query, options=...)``)."""
        ...

    def info(self) -> dict[str, Any]:
        """Model, precision and options, as the server's ``info`` op reports them."""
        ...


@runtime_checkable
class AsyncSegmentBackend(Protocol):
    """The asyncio twin of :class:`SegmentBackend` (an :class:`~lisa_agent.serving.client.AsyncLisaClient`)."""

    async def segment(self, image: Frame | np.ndarray, query: str, options: QueryOptions | None = None, *,
                      frame_id: str | None = None, mode: str | None = None, max_new_tokens: int | None = None,
                      answer: str | None = None, return_logits: bool | None = None) -> SegmentationResult:
        ...

    async def info(self) -> dict[str, Any]:
        ...


def is_server_address(address: object) -> bool:
    """True when ``address`` names a model server (``tcp://``, ``ipc://``, ``http(s)://``), not a model."""
    return isinstance(address, str) and address.strip().lower().startswith(SERVER_SCHEMES)


def open_backend(model_or_address: str | None = None, *, config: EngineConfig | None = None, timeout: float = 10.0,
                 retries: int = 2, client_options: Mapping[str, Any] | None = None,
                 **engine_options: Any) -> SegmentBackend:
    """The backend ``model_or_address`` names: a client of the model server at a ``tcp://``, ``ipc://`` or
    ``http(s)://`` address, else the model itself, loaded in this process (slow: seconds to minutes).

    Args:
        model_or_address: a server address, or a model (Hub id, folder, bundled name); None: ``config``'s
            model (the bundled ``tabletop-tiny`` by default).
        config: how to load a model (:class:`~lisa_agent.config.EngineConfig`); ``engine_options`` change
            single fields. Ignored for a server, whose own options apply there.
        timeout, retries: a client's seconds per reply and extra attempts.
        client_options: more keywords for the client (``curve_server_key``, ``curve_client_keys``).

    Raises:
        lisa_agent.errors.LisaError: naming what is wrong (an unknown option, a missing model, ...).
    """
    if is_server_address(model_or_address):
        if engine_options:
            raise InvalidArgumentError(f"model options {sorted(engine_options)} do not apply to the model server "
                                       f"at {model_or_address}: its own options apply there")
        from .serving.client import LisaClient

        return LisaClient(str(model_or_address).strip(), timeout=timeout, retries=retries, **dict(client_options or {}))
    config = config or EngineConfig()
    if model_or_address is not None or engine_options:
        config = config.replace(**({"model": str(model_or_address)} if model_or_address else {}), **engine_options)
    return load_model(config)


def load_model(config: EngineConfig) -> SegmentBackend:
    """The in-process model ``config.model`` names, with ``config``'s options: a reasoner
    (:func:`lisa_agent.reasoner.loading.load_reasoner`) when the checkpoint's ``config.json`` says
    ``model_type: qwen2_5_vl``, else the LISA engine (:meth:`LisaSegmenter.from_config
    <lisa_agent.engine.segmenter.LisaSegmenter.from_config>`, the default and the bundled ``tabletop-tiny``)."""
    from .reasoner.loading import is_reasoner, load_reasoner

    if is_reasoner(config.model):
        backend: SegmentBackend = load_reasoner(config)
        return backend
    from .engine.segmenter import LisaSegmenter

    return LisaSegmenter.from_config(config)


__all__ = ["DEFAULT_MODEL", "SERVER_SCHEMES", "AsyncSegmentBackend", "SegmentBackend", "is_server_address",
           "load_model", "open_backend"]
