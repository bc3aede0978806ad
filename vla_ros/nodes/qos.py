"""The QoS of every vla_ros stream, in one place (the topic table of the docs follows this file).

Rules, measured against the stock tools (``ros2 topic pub`` publishes reliable + volatile):

* A subscription to an **operator or driver input** (instruction, e-stop, camera, joint states)
  must match both a volatile publisher (the CLI default) and a latched (transient_local) one. A
  transient_local *subscription* never matches a volatile publisher -- silently -- so these
  subscriptions are volatile (``OPERATOR_INPUT``), or best effort where only the newest sample
  matters (``SENSOR_DATA``, ``JOINT_STATES``: a best-effort reader matches reliable and best-effort
  writers alike).
* A volatile subscription does not receive a latched publisher's history. Where a node must learn
  a held value on start (the e-stop after a restart), it adds a second subscription with
  ``LATCHED_INPUT`` on the same topic, which matches latched publishers only.
* ``ros2 topic pub --once`` publishes as soon as *one* subscriber has matched, so an operator
  topic has one subscriber in the graph, and the owner re-publishes what others need on a latched
  topic of our own (``LATCHED``): the camera node owns ``instruction`` and publishes ``episode``.
"""

from __future__ import annotations

from rclpy.duration import Duration
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    LivelinessPolicy,
    QoSProfile,
    ReliabilityPolicy,
)

#: Liveliness lease of the action stream [s]: the safety node treats a silent writer as dead.
ACTION_LIVELINESS_LEASE = 0.5

#: Camera frames (in) and the simulated camera (out): best effort, newest only.
SENSOR_DATA = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.BEST_EFFORT,
                         durability=DurabilityPolicy.VOLATILE)

#: Joint states (in): best effort so that reliable and best-effort drivers both match.
JOINT_STATES = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.BEST_EFFORT,
                          durability=DurabilityPolicy.VOLATILE)

#: Subscriptions to operator inputs (instruction, e-stop, enable): reliable + volatile, which
#: matches ``ros2 topic pub``'s default and latched publishers alike.
OPERATOR_INPUT = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)

#: A second subscription on an operator input, to receive a latched publisher's held value on
#: start (matches transient_local publishers only).
LATCHED_INPUT = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)

#: Our own latched outputs (episode, safety status, task success) and their subscriptions.
LATCHED = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)

#: Observations, camera node -> VLA node: reliable, newest only.
LATEST = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                    reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE)

#: Actions, VLA node -> safety node: reliable, newest only, liveliness so a dead writer is seen.
ACTION = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                    reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.VOLATILE,
                    liveliness=LivelinessPolicy.AUTOMATIC,
                    liveliness_lease_duration=Duration(seconds=ACTION_LIVELINESS_LEASE))

#: Commands to the arm and gripper (out), markers and diagnostics: reliable, a short queue.
COMMAND = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.VOLATILE)
