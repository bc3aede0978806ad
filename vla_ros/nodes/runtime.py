"""One way to run a node process: init, spin until SIGINT/SIGTERM, shut down cleanly, exit 0.

rclpy's own SIGINT handler can interrupt a receive half-way and end the process with an
exception and a non-zero status; here the signals only set a flag, the executor spins in short
slices and stops at the next one, and the node is destroyed before the context is shut down.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import rclpy
from rclpy.executors import Executor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions


def run_node(make_node: Callable[[], Node], args: list[str] | None = None, *,
             on_start: Callable[[Node], None] | None = None,
             on_stop: Callable[[Node], None] | None = None,
             executor: Executor | None = None) -> None:
    """Create the node with ``make_node``, spin it until a signal, then tear everything down.

    ``on_start`` runs once the node exists (e.g. lifecycle autostart), ``on_stop`` before the
    node is destroyed (e.g. a last zero command).
    """
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = make_node()
    executor = executor or SingleThreadedExecutor()
    executor.add_node(node)
    try:
        if on_start is not None:
            on_start(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    finally:
        if on_stop is not None:
            on_stop(node)
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
        # Nothing is left to stop: a second Ctrl-C (a terminal signals the whole process group
        # and ros2 launch forwards one more) must not kill the interpreter while it exits.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
