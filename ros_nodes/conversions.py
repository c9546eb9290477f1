"""sensor_msgs <-> numpy for the ROS node: the ROS-free decoders of :mod:`lisa_agent.integrations.image_messages`, plus
:func:`to_image_msg`, which builds an rclpy ``sensor_msgs.msg.Image`` (sensor_msgs imported only there)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lisa_agent.errors import MalformedImageError, UnsupportedEncodingError  # noqa: F401  (re-exported)
from lisa_agent.images import encode_jpeg  # noqa: F401  (re-exported for the node and its tests)
from lisa_agent.integrations.image_messages import (  # noqa: F401  (re-exported for the node and its tests)
    COLOR_ENCODINGS,
    DEPTH_ENCODINGS,
    ENCODINGS,
    camera_info_intrinsics,
    compressed_to_rgb,
    depth_to_meters_array,
    image_fields,
    image_to_array,
    image_to_rgb,
)


def to_image_msg(array: np.ndarray, encoding: str, header: Any = None) -> Any:
    """An rclpy ``sensor_msgs.msg.Image`` holding ``array`` (fields from :func:`image_fields`)."""
    from sensor_msgs.msg import Image

    fields = image_fields(array, encoding)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.step = fields["height"], fields["width"], fields["step"]
    msg.encoding, msg.is_bigendian = fields["encoding"], fields["is_bigendian"]
    msg.data = fields["data"]
    return msg
