"""``lisa_lifecycle_node``: :class:`~ros_nodes.lisa_node.LisaNode` as a managed (lifecycle) node, as Nav2 systems
expect.

Transitions (``ros2 lifecycle set /lisa_node configure`` ..., or a lifecycle manager):

* ``configure``: load the model (or connect to the model server ``server``); slow, so a manager calls it
  once at bring-up;
* ``activate``: subscribe to the camera, depth and instruction topics, create the outputs, start the worker
  and serve the ``Segment`` action and service;
* ``deactivate``: stop the worker (it finishes the frame it is on), drop the subscriptions, outputs and the
  action; the model stays loaded, so ``activate`` again is instant;
* ``cleanup``: free the model (its GPU memory: the engine is dropped and CUDA's cache emptied);
* ``shutdown``: as cleanup, from any state.

``/diagnostics`` reports the state all along (``unconfigured``, ``inactive``, ``ready`` when active). The plain
``lisa_node`` stays the default: it needs no manager and no ``ros2 lifecycle`` calls, which is what most users
running one perception node want; systems that bring nodes up in order (Nav2's lifecycle manager) use this one.

Run::

    python -m ros_nodes.lisa_lifecycle_node --ros-args -p model:=tabletop-tiny
    ros2 run lisa_agent lisa_lifecycle_node --ros-args -p model:=tabletop-tiny
"""

from __future__ import annotations

import gc
import sys
from typing import Any

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn

from lisa_agent.errors import describe_error

from .lisa_node import LisaNode, run_node


class LisaLifecycleNode(LisaNode, LifecycleNode):
    """The LISA node with the managed-node transitions (see the module's docstring); starts ``unconfigured``."""

    def __init__(self, node_name: str = "lisa_node", **kwargs: Any) -> None:
        super().__init__(node_name, interfaces=False, **kwargs)
        self._state = "unconfigured"

    @property
    def model_loaded(self) -> bool:
        return self._backend is not None

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.load_backend()
        except Exception as exc:  # a bad model name, an unreachable server: stay unconfigured, say why
            info = describe_error(exc)
            self.get_logger().error(f"configure failed ({info.code}): {info.message}")
            return TransitionCallbackReturn.FAILURE
        self._state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.open_interfaces()
        self.start()
        self._state = "ready"
        self.get_logger().info("active: subscribed, publishing, serving the Segment action")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._pause()
        self._state = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._free()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._pause()
        self._free()
        return TransitionCallbackReturn.SUCCESS

    def _pause(self) -> None:
        self.stop()
        self.close_interfaces()

    def _free(self) -> None:
        """Drop the model and return its GPU memory to the device."""
        backend, self._backend = self._backend, None
        close = getattr(backend, "close", None)
        if callable(close):  # a model server's client: its socket
            close()
        del backend
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency of the library
            pass
        self._state = "unconfigured"
        self.get_logger().info("cleaned up: model freed")


def main(args: list[str] | None = None) -> int:
    """Entry point of ``ros2 run lisa_agent lisa_lifecycle_node`` and ``python -m ros_nodes.lisa_lifecycle_node``."""
    return run_node("lisa_lifecycle_node", LisaLifecycleNode, args)


if __name__ == "__main__":
    sys.exit(main())
