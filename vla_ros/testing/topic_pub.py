"""Publish one message the way ``ros2 topic pub --once`` does (Jazzy and later), for tests.

ros2cli is not on the pip path, so tests run this module in place of ``ros2 topic pub`` with the
same arguments. What it reproduces, from ros2cli's ``ros2topic/verb/pub.py`` and
``ros2cli/node/direct.py``: a node that first spins 0.5 s for discovery, then creates the
publisher with the ``default`` QoS preset (reliable, volatile, keep last 10) unless
``--qos-*`` options say otherwise; with ``--once`` it waits, polling every 0.1 s, until *one*
subscription has matched (``-w N`` for N; ``--max-wait-time-secs`` bounds the wait, forever by
default), publishes one message, sleeps ``--keep-alive`` (0.1 s) and exits. Humble's ros2cli
differs: it publishes transient_local with depth 1 by default (``--qos-durability
transient_local`` reproduces that).

    python -m vla_ros.testing.topic_pub --once /vla/estop std_msgs/msg/Bool "{data: true}"
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence

#: ros2cli's DirectNode spin before it does anything (ros2cli.node.direct.DEFAULT_TIMEOUT) [s].
DISCOVERY_SPIN = 0.5
#: How often ``--once`` polls the matched-subscription count (pub.py DEFAULT_WAIT_TIME) [s].
POLL_PERIOD = 0.1


def message_class(name: str) -> type:
    """``std_msgs/msg/String`` or ``std_msgs/String`` -> the generated message class."""
    parts = name.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f'The passed message type is invalid: {name!r}')
    try:
        return getattr(importlib.import_module(f'{parts[0]}.{parts[1]}'), parts[2])
    except (ImportError, AttributeError):
        raise ValueError(f'The passed message type is invalid: {name!r}') from None


def fill(msg: object, values: dict) -> object:
    """Set the fields of ``msg`` from a YAML mapping (nested messages as nested mappings)."""
    for key, value in values.items():
        if not hasattr(msg, key):
            raise ValueError(f'{type(msg).__name__} has no field {key!r}')
        if isinstance(value, dict):
            fill(getattr(msg, key), value)
        else:
            setattr(msg, key, value)
    return msg


def build_parser() -> argparse.ArgumentParser:
    """The subset of ``ros2 topic pub``'s options that the docs and tests use."""
    parser = argparse.ArgumentParser(prog='ros2 topic pub')
    parser.add_argument('topic_name')
    parser.add_argument('message_type')
    parser.add_argument('values', nargs='?', default='{}')
    parser.add_argument('-1', '--once', action='store_true')
    parser.add_argument('-w', '--wait-matching-subscriptions', type=int, default=None)
    parser.add_argument('--max-wait-time-secs', type=float, default=None)
    parser.add_argument('--keep-alive', type=float, default=0.1)
    parser.add_argument('--qos-durability', choices=('volatile', 'transient_local'))
    parser.add_argument('--qos-reliability', choices=('reliable', 'best_effort'))
    parser.add_argument('--qos-depth', type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Publish like ``ros2 topic pub --once``; 0 when published, 1 on an error or time-out."""
    import rclpy
    import yaml
    from rclpy.qos import DurabilityPolicy, QoSPresetProfiles, ReliabilityPolicy

    args = build_parser().parse_args(argv)
    if not args.once:
        print('only --once is reproduced here', file=sys.stderr)
        return 1
    profile = QoSPresetProfiles.get_from_short_key('default')
    if args.qos_durability:
        profile.durability = DurabilityPolicy.get_from_short_key(args.qos_durability)
    if args.qos_reliability:
        profile.reliability = ReliabilityPolicy.get_from_short_key(args.qos_reliability)
    if args.qos_depth:
        profile.depth = args.qos_depth
    wanted = 1 if args.wait_matching_subscriptions is None else args.wait_matching_subscriptions
    values = yaml.safe_load(args.values)
    if not isinstance(values, dict):
        print('The passed value needs to be a dictionary in YAML format', file=sys.stderr)
        return 1
    msg = fill(message_class(args.message_type)(), values)

    rclpy.init()
    node = rclpy.create_node(f'_ros2cli_{os.getpid()}')
    try:
        end = time.monotonic() + DISCOVERY_SPIN
        while time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=max(0.0, end - time.monotonic()))
        pub = node.create_publisher(type(msg), args.topic_name, profile)
        waited = 0.0
        while pub.get_subscription_count() < wanted:
            if waited == 0.0:
                print(f'Waiting for at least {wanted} matching subscription(s)...', flush=True)
            if args.max_wait_time_secs is not None and waited >= args.max_wait_time_secs:
                print(f'Timed out waiting for subscribers: Expected {wanted} subcribers but '
                      f'only got {pub.get_subscription_count()} subscribers', file=sys.stderr)
                return 1
            time.sleep(POLL_PERIOD)
            waited += POLL_PERIOD
        print('publisher: beginning loop', flush=True)
        print(f'publishing #1: {msg!r}\n', flush=True)
        pub.publish(msg)
        time.sleep(args.keep_alive)
        return 0
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
