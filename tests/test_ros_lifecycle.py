"""The managed (lifecycle) node: configure loads the model, activate subscribes and answers, deactivate pauses,
cleanup frees the model. The node runs in this process (its own rclpy context and executor thread) so the test
can hold a weak reference to the engine; a probe node talks to it over real DDS."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from ros_helpers import Probe, image_msg, stamp

from ros_nodes.lisa_lifecycle_node import LisaLifecycleNode

pytestmark = pytest.mark.slow  # real DDS between two nodes

DOMAIN = 94


def _subscribed(node: LisaLifecycleNode, topic: str) -> bool:
    return any(s.topic_name == topic for s in node.subscriptions)


def test_lifecycle_transitions_load_serve_pause_and_free_the_model(tiny_checkpoint):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    params = {"model": str(tiny_checkpoint), "device": "cpu", "dtype": "fp32", "camera_qos": "reliable",
              "image_topic": "/camera/image"}
    node = LisaLifecycleNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    probe = Probe(DOMAIN, name="lifecycle_probe")
    try:
        # unconfigured: no model, no subscriptions
        assert not node.model_loaded and not _subscribed(node, "/camera/image")
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.model_loaded and not _subscribed(node, "/camera/image")  # inactive: loaded, not listening
        engine = weakref.ref(node.backend)

        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert _subscribed(node, "/camera/image") and _subscribed(node, "/lisa_node/instruction")
        rgb = np.zeros((40, 56, 3), np.uint8)
        rgb[10:30, 20:40] = (200, 30, 30)
        header = stamp(int(time.time()), 77, "lifecycle_cam")
        frame = image_msg(rgb, "rgb8", header)
        mask = probe.wait_for("mask", lambda m: m.header.frame_id == "lifecycle_cam", 120,
                              poke=lambda: (probe.pub_image.publish(frame), probe.say("the red square")))
        assert (mask.height, mask.width) == (40, 56)

        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert not _subscribed(node, "/camera/image") and node.model_loaded  # paused, model kept

        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS  # instant: the model is still loaded
        assert _subscribed(node, "/camera/image") and node.backend is engine()
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS

        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert not node.model_loaded
        gc.collect()
        assert engine() is None, "cleanup must drop every reference to the engine (its GPU memory with it)"
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS and node.model_loaded  # and again
    finally:
        probe.close()
        executor.shutdown(timeout_sec=2.0)
        spin.join(5.0)
        node.stop()
        node.destroy_node()
        rclpy.try_shutdown(context=context)


def test_configure_fails_cleanly_on_a_missing_model(tmp_path):
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=DOMAIN)
    node = LisaLifecycleNode(context=context,
                             parameter_overrides=[Parameter("model", value=str(tmp_path / "no-such-model"))])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert not node.model_loaded
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=context)
