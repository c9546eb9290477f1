"""ROS 2 side of lisa-agent: the ``lisa_node`` node, message conversions and a camera image source.

Every rclpy import of the project lives in this package (``lisa_agent`` never imports ROS). This
``__init__`` imports nothing, so ``import ros_nodes.conversions`` works without a ROS installation
for the numpy-only functions.
"""
