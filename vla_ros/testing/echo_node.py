"""A node that echoes ``Observation`` and ``VlaAction`` back on ``*_echo`` topics.

Used by graph tests to prove that the generated messages cross a process boundary over Fast DDS
intact; run with ``python -m vla_ros.testing.echo_node``.
"""

from __future__ import annotations

from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from vla_ros.msg import Observation, VlaAction
from vla_ros.nodes.runtime import run_node


class EchoNode(Node):
    """Republishes every Observation and VlaAction it receives, unchanged."""

    def __init__(self) -> None:
        super().__init__('echo_node')
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._obs_pub = self.create_publisher(Observation, 'observation_echo', qos)
        self._act_pub = self.create_publisher(VlaAction, 'action_echo', qos)
        self.create_subscription(Observation, 'observation', self._obs_pub.publish, qos)
        self.create_subscription(VlaAction, 'action', self._act_pub.publish, qos)
        self.get_logger().info('echo node ready')


def main() -> None:
    """Run the echo node until SIGINT/SIGTERM."""
    run_node(EchoNode)


if __name__ == '__main__':
    main()
