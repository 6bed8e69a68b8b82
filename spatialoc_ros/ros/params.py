"""Parameter declaration shared by the nodes.

Every parameter is declared with a description, its type, and (for numbers) an
``IntegerRange`` / ``FloatingPointRange`` that ``ros2 param describe`` shows and rclpy enforces
on every later change. An invalid start-up value (wrong type, out of range, refused by the node's
own check) does not end the process and is not replaced silently: the parameter is declared with
its default, and the problem is returned so that the node's ``configure`` fails with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: default, description, optional inclusive range (numbers), optional extra
    check (value -> reason or None), and whether it can change at run time without a new
    configure (``dynamic``)."""

    default: Any
    description: str
    low: Optional[float] = None
    high: Optional[float] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    dynamic: bool = False

    @property
    def ptype(self) -> int:
        return _TYPES[type(self.default)]

    def descriptor(self) -> ParameterDescriptor:
        text = self.description + ("" if self.dynamic else " (takes effect at the next configure)")
        d = ParameterDescriptor(description=text, type=self.ptype)
        if self.low is not None and self.ptype == ParameterType.PARAMETER_INTEGER:
            d.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=1)]
        elif self.low is not None and self.ptype == ParameterType.PARAMETER_DOUBLE:
            d.floating_point_range = [FloatingPointRange(from_value=float(self.low), to_value=float(self.high), step=0.0)]
        return d

    def problem(self, name: str, value: Any) -> Optional[str]:
        """Why ``value`` is not acceptable (range, NaN, the extra check), or None."""
        if self.low is not None:
            number = float(value)
            if not (math.isfinite(number) and self.low <= number <= self.high):
                return f"{name} must be in {self.low:g}..{self.high:g}, got {value!r}"
        if self.check is not None:
            return self.check(value)
        return None


def declare_all(node: Node, specs: dict[str, ParamSpec]) -> dict[str, str]:
    """Declare every parameter of ``specs``; returns {name: problem} for the start-up values that
    were refused (the parameter then holds its default until set again). Register
    :func:`refusal` as an on-set-parameters callback first, so that later changes are checked
    the same way."""
    problems: dict[str, str] = {}
    for name, spec in specs.items():
        try:
            value = node.declare_parameter(name, spec.default, spec.descriptor()).value
        except (InvalidParameterTypeException, InvalidParameterValueException) as e:
            wrong_type = isinstance(e, InvalidParameterTypeException)
            hint = " (write doubles with a decimal point, e.g. 2.0)" if wrong_type and isinstance(spec.default, float) else ""
            problems[name] = f"{name}: {e}{hint}"
            node.declare_parameter(name, spec.default, spec.descriptor(), ignore_override=True)
            continue
        why = spec.problem(name, value)
        if why is not None:  # no refusal callback registered: keep the default all the same
            problems[name] = why
            node.set_parameters([Parameter(name, value=spec.default)])
    return problems


def refusal(specs: dict[str, ParamSpec], params) -> Optional[str]:
    """For an on-set-parameters callback: the reason to refuse ``params``, or None."""
    for p in params:
        spec = specs.get(p.name)
        if spec is None:
            continue
        why = spec.problem(p.name, p.value)
        if why is not None:
            return why
    return None


def frame_problem(value: Any, allow_empty: bool = False) -> Optional[str]:
    """Why ``value`` cannot be a tf frame id (empty unless ``allow_empty``, or with whitespace), or None."""
    text = str(value)
    if (not allow_empty and not text.strip()) or any(c.isspace() for c in text):
        return f"frame_id must be a {'' if allow_empty else 'non-empty '}name without spaces, got {value!r}"
    return None
