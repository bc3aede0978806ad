"""The safety path: limiter state machine, its stages, config table, watchdogs, gripper, latch.

Numpy only (pinocchio through ``vla_ros.core.kinematics`` when kinematics is used); no rclpy.
``SafetyLimiter`` (``limiter``) is the state machine the safety node feeds; ``SafetyConfig``
(``config``) holds every parameter with its unit and range; ``stages`` holds the pure limit
stages, ``watchdog`` the input freshness rules, ``gripper`` the gripper gate, ``latch`` the
persisted stop latch and ``shadow`` the shadow-mode comparison.
"""

from vla_ros.core.safety.config import SafetyConfig, Spec, specs
from vla_ros.core.safety.limiter import (
    AXES,
    GRIPPER_UNKNOWN,
    PROTECTIVE,
    Decision,
    SafetyLimiter,
    SafetyState,
)

__all__ = ['AXES', 'GRIPPER_UNKNOWN', 'PROTECTIVE', 'Decision', 'SafetyConfig', 'SafetyLimiter',
           'SafetyState', 'Spec', 'specs']
