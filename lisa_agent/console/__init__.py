"""The teleoperation console: see what the robot sees, type an instruction, watch the answer, pick the target.

``lisa-agent console --source synthetic`` (``lisa_agent.commands.console``) serves a web page and an
HTTP/WebSocket API (``docs/console.md``) and, with ``--foxglove-port``, a Foxglove live view; ``--record``
writes the session to MCAP. The pieces, each usable on its own:

- :mod:`lisa_agent.console.sources`: where frames come from (a slowly changing synthetic tabletop
  scene with ground truth, an OpenCV camera, a video file, a ROS topic).
- :mod:`lisa_agent.console.core`: the console's state and the model calls (no web code): instruction,
  mode, the continuous switch (:class:`~lisa_agent.tracking.StreamSegmenter`), the chosen target;
  :mod:`lisa_agent.console.answers`: the frames and answers it hands its listeners.
- :mod:`lisa_agent.console.web`: the aiohttp application (page, API, WebSocket, token check).
- :mod:`lisa_agent.integrations.foxglove`: the Foxglove WebSocket server and MCAP recorder (foxglove-sdk),
  also used by the ROS node's ``foxglove_port`` option.

Nothing here is imported by ``import lisa_agent``; the web stack (aiohttp) and foxglove-sdk are imported
only by the modules that need them (``pip install lisa-agent[console]``).
"""

from __future__ import annotations

from typing import Any

#: The console's query options where they differ from the library's (:class:`~lisa_agent.options.QueryOptions`):
#: an operator reads the model's answer, so instructions are answered in chat mode unless they say otherwise.
CONSOLE_QUERY_DEFAULTS: dict[str, Any] = {"mode": "chat"}

__all__ = ["CONSOLE_QUERY_DEFAULTS"]
