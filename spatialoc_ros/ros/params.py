"""Parameter declaration shared by the nodes."""
from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.node import Node


def declare_or_default(node: Node, name: str, default: Any, descriptor: ParameterDescriptor) -> Any:
    """Declare a parameter; an override of the wrong type (e.g. ``-p service_wait_s:=2`` for a
    double) is logged in one line and the default used, instead of ending the node."""
    try:
        return node.declare_parameter(name, default, descriptor).value
    except InvalidParameterTypeException as e:
        hint = " (write doubles with a decimal point, e.g. 2.0)" if isinstance(default, float) else ""
        node.get_logger().error(f"invalid parameter type for {name}: {e}; using the default {default!r}{hint}")
        return node.declare_parameter(name, default, descriptor, ignore_override=True).value
