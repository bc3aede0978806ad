"""Declare node parameters from one table, each with a descriptor (description, range, read-only).

A node lists its parameters as :class:`Param` rows; :func:`declare` declares them all with
ranges (``FloatingPointRange``/``IntegerRange``) and returns their values as a dict, ready for a
core config dataclass whose ``__post_init__`` does the real validation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node


@dataclass(frozen=True)
class Param:
    """One parameter: name, default, description, optional [low, high] and read-only flag."""

    name: str
    default: object
    description: str
    low: float | None = None
    high: float | None = None
    read_only: bool = False


def descriptor(p: Param) -> ParameterDescriptor:
    """The ParameterDescriptor for ``p`` (range only for numbers with both bounds)."""
    d = ParameterDescriptor(description=p.description, read_only=p.read_only)
    if p.low is not None and p.high is not None:
        if isinstance(p.default, bool):
            pass
        elif isinstance(p.default, int):
            d.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=1)]
        elif isinstance(p.default, float):
            d.floating_point_range = [
                FloatingPointRange(from_value=float(p.low), to_value=float(p.high), step=0.0)]
    return d


def declare(node: Node, params: Iterable[Param]) -> dict[str, object]:
    """Declare every parameter of ``params`` on ``node`` and return {name: value}."""
    values: dict[str, object] = {}
    for p in params:
        node.declare_parameter(p.name, p.default, descriptor(p))
        values[p.name] = node.get_parameter(p.name).value
    return values
