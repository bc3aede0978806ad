"""The node list and launch arguments, defined once for bringup.launch.py and ``vla-ros bringup``.

Both launch paths read :func:`node_specs` and :data:`LAUNCH_ARGUMENTS`, so the launch file and the
pip-path runner cannot drift: same nodes, same parameter files, same remappings. Topic names
inside nodes are relative; everything external (camera driver, MoveIt Servo, joint states) is a
remapping listed here. No ROS import: the runner and the tests use this without ``launch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vla_ros.core.errors import ConfigError

PACKAGE = 'vla_ros'


@dataclass(frozen=True)
class LaunchArgument:
    """A public launch argument: name, default (as a string, like launch) and description."""

    name: str
    default: str
    description: str
    choices: tuple[str, ...] = ()


#: The small OpenVLA trained on the simulated tasks, in ``checkpoints/`` (see its README).
DEFAULT_CHECKPOINT = 'sim_tabletop'

#: The nodes each ``role`` starts: the robot host keeps everything that touches the arm, the
#: inference host (the GPU) only the policy; they meet over DDS (docs/fleet.md).
ROLES: Mapping[str, tuple[str, ...]] = {
    'all': ('camera_node', 'vla_node', 'safety_node', 'sim_arm_node'),
    'robot': ('camera_node', 'safety_node', 'sim_arm_node'),
    'inference': ('vla_node',),
}

LAUNCH_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument('namespace', 'vla', 'Namespace of the VLA nodes (one per arm).'),
    LaunchArgument('model_path', '',
                   'OpenVLA checkpoint directory (HF format); empty = the shipped small '
                   'checkpoint trained on the simulated arm (checkpoints/sim_tabletop).'),
    LaunchArgument('unnorm_key', '',
                   'Dataset whose statistics un-normalize actions (required when the checkpoint '
                   'has several, e.g. bridge_orig).'),
    LaunchArgument('quantization', 'none', 'Weight precision of the language model.',
                   ('none', 'int4')),
    LaunchArgument('device', 'auto', 'Torch device for inference (auto = cuda if available).'),
    LaunchArgument('camera_topic', '/camera/image_raw',
                   'sensor_msgs/Image from the camera driver (the base topic with '
                   'camera_transport:=compressed).'),
    LaunchArgument('camera_transport', 'raw',
                   'raw = sensor_msgs/Image on camera_topic; compressed = image_transport\'s '
                   'compressed transport, sensor_msgs/CompressedImage (JPEG/PNG) on '
                   '<camera_topic>/compressed.', ('raw', 'compressed')),
    LaunchArgument('use_sim', 'false', 'Start the simulated arm and camera instead of hardware.',
                   ('true', 'false')),
    LaunchArgument('rviz', 'false', 'Start rviz2 with config/vla.rviz (ROS install only).',
                   ('true', 'false')),
    LaunchArgument('output_mode', 'twist',
                   'twist = TwistStamped for MoveIt Servo; pose = PoseStamped target on '
                   '/servo_node/pose_target_cmds (MoveIt Servo pose input).',
                   ('twist', 'pose')),
    LaunchArgument('safety_config', '',
                   'YAML file with safety_node parameters; empty = config/safety_node.yaml.'),
    LaunchArgument('servo_topic', '/servo_node/delta_twist_cmds',
                   'Where the limited TwistStamped goes (MoveIt Servo input).'),
    LaunchArgument('joint_states_topic', '/joint_states', 'sensor_msgs/JointState of the arm.'),
    LaunchArgument('log_level', 'info', 'Log level of all nodes.',
                   ('debug', 'info', 'warn', 'error')),
    LaunchArgument('role', 'all',
                   'Which nodes this host starts: all; robot = camera and safety nodes (and the '
                   'simulated arm with use_sim); inference = the VLA node (docs/fleet.md).',
                   tuple(ROLES)),
)

DEFAULTS: Mapping[str, str] = {a.name: a.default for a in LAUNCH_ARGUMENTS}


@dataclass(frozen=True)
class NodeSpec:
    """One node of the graph, as both launch paths start it."""

    name: str
    module: str
    params_file: str
    parameters: Mapping[str, object] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()
    namespaced: bool = True

    @property
    def executable(self) -> str:
        """Executable name installed under lib/vla_ros (REP-144: ``<role>_node``)."""
        return self.name


def resolve_arguments(values: Mapping[str, str] | None = None) -> dict[str, str]:
    """Merge ``values`` over the defaults; unknown names and bad choices raise ConfigError."""
    merged = dict(DEFAULTS)
    for key, value in (values or {}).items():
        if key not in merged:
            raise ConfigError(f'unknown launch argument {key!r}; known: {sorted(merged)}')
        merged[key] = str(value)
    for arg in LAUNCH_ARGUMENTS:
        if arg.choices and merged[arg.name] not in arg.choices:
            raise ConfigError(
                f'launch argument {arg.name}={merged[arg.name]!r} is not one of {arg.choices}')
    return merged


def ns_topic(namespace: str, name: str) -> str:
    """The absolute topic ``/<namespace>/<name>`` (``/<name>`` for an empty namespace)."""
    ns = namespace.strip('/')
    return f'/{ns}/{name}' if ns else f'/{name}'


def config_dir() -> Path:
    """The folder holding config/*.yaml: the source tree, or the installed share folder."""
    here = Path(__file__).resolve().parent.parent / 'config'
    if (here / 'fastdds_shm.xml').is_file():  # not any other package's ``config`` folder
        return here
    try:
        from ament_index_python.packages import get_package_share_directory
    except ImportError as exc:  # pragma: no cover - only without both layouts
        raise ConfigError('cannot find the vla_ros config folder') from exc
    return Path(get_package_share_directory(PACKAGE)) / 'config'


def default_checkpoint() -> Path:
    """The shipped checkpoint trained on the simulated tasks (source tree or share folder)."""
    return config_dir().parent / 'checkpoints' / DEFAULT_CHECKPOINT


def node_specs(values: Mapping[str, str] | None = None) -> list[NodeSpec]:
    """The nodes to start for the given launch arguments, in start order."""
    args = resolve_arguments(values)
    cfg = config_dir()
    camera_topic = args['camera_topic']
    specs = [
        NodeSpec('camera_node', 'vla_ros.nodes.camera_node', str(cfg / 'camera_node.yaml'),
                 parameters={'image_transport': args['camera_transport']},
                 remappings=(('image', camera_topic),)),
        NodeSpec('vla_node', 'vla_ros.nodes.vla_node', str(cfg / 'vla_node.yaml'),
                 remappings=(('diagnostics', '/diagnostics'),),
                 parameters={'model_path': args['model_path'], 'unnorm_key': args['unnorm_key'],
                             'quantization': args['quantization'], 'device': args['device']}),
        NodeSpec('safety_node', 'vla_ros.nodes.safety_node',
                 args['safety_config'] or str(cfg / 'safety_node.yaml'),
                 parameters={'output_mode': args['output_mode']},
                 remappings=(('twist', args['servo_topic']),
                             ('pose_target', '/servo_node/pose_target_cmds'),
                             ('joint_states', args['joint_states_topic']),
                             ('wrench', '/wrench'),  # the arm's tool wrench (contact stop)
                             ('diagnostics', '/diagnostics'))),
    ]
    if args['use_sim'] == 'true':
        ns = args['namespace']
        specs.append(NodeSpec(
            'sim_arm_node', 'vla_ros.nodes.sim_arm_node', str(cfg / 'sim_arm_node.yaml'),
            remappings=(('image_raw', camera_topic),
                        ('joint_states', args['joint_states_topic']),
                        ('twist', args['servo_topic']),
                        ('gripper_command', ns_topic(ns, 'gripper_command')),
                        ('episode', ns_topic(ns, 'episode')),
                        ('ee_pose', '/sim/ee_pose'),
                        ('task_success', '/sim/task_success'),
                        ('world_state', '/sim/world_state')),
            namespaced=False))
    return [s for s in specs if s.name in ROLES[args['role']]]


def ros_args(spec: NodeSpec, namespace: str, log_level: str = 'info') -> list[str]:
    """Command-line ``--ros-args`` for ``spec`` (what launch_ros would pass)."""
    out = ['--ros-args', '-r', f'__node:={spec.name}', '--log-level', log_level]
    if spec.namespaced and namespace:
        out += ['-r', f'__ns:=/{namespace.strip("/")}']
    out += ['--params-file', spec.params_file]
    for key, value in spec.parameters.items():
        out += ['-p', f'{key}:={_param_literal(value)}']
    for src, dst in spec.remappings:
        out += ['-r', f'{src}:={dst}']
    return out


def _param_literal(value: object) -> str:
    """A ``-p name:=value`` literal that keeps strings strings (YAML-quoted)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value).lower() if isinstance(value, bool) else str(value)
