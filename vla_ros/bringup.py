"""The node list and launch arguments, defined once for bringup.launch.py and ``vla-ros bringup``.

Both launch paths read :func:`node_specs` and :data:`LAUNCH_ARGUMENTS`, so the launch file and the
pip-path runner cannot drift: same nodes, same parameter files, same remappings. Topic names
inside nodes are relative; everything external (camera driver, MoveIt Servo, joint states) is a
remapping listed here. With ``robots`` (one VLA node serving several arms), every arm gets its
own camera, safety (and simulated) nodes in ``/<arm>/<namespace>`` and its external topics under
``/<arm>`` (``/arm1/camera/image_raw``, ...). No ROS import: the runner and the tests use this
without ``launch``.
"""

from __future__ import annotations

import re
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
    LaunchArgument('robots', '',
                   'Arms served by one VLA node, as a comma list (arm1,arm2; [arm1,arm2] also '
                   'parses): each arm gets camera and safety nodes (and a simulated arm with '
                   'use_sim) in /<arm>/<namespace>, its external topics under /<arm> '
                   '(/arm1/camera/image_raw, ...); empty = one arm, no prefix (docs/fleet.md).'),
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
    arm: str = ''

    @property
    def executable(self) -> str:
        """Executable name installed under lib/vla_ros (REP-144: ``<role>_node``)."""
        return self.name

    @property
    def label(self) -> str:
        """Unique name of this node in a bringup: ``<arm>/<name>``, or ``<name>`` alone."""
        return f'{self.arm}/{self.name}' if self.arm else self.name

    def namespace_in(self, namespace: str) -> str:
        """This node's namespace in a bringup of ``namespace``, without slashes at the ends.

        ``<arm>/<namespace>`` for a node of one arm of ``robots`` (``<arm>`` alone for one that
        is not namespaced), ``namespace`` or '' otherwise.
        """
        return arm_namespace(self.arm, namespace if self.namespaced else '')


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


_NAME_TOKEN = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')


def parse_namespaces(text: str, what: str = 'robots', base: str = '/') -> tuple[str, ...]:
    """The absolute namespaces of a comma list (``arm1,arm2``, or ``[arm1, arm2]``); '' gives ().

    Each entry is a ROS namespace (tokens of letters, digits and ``_``, not starting with a
    digit, joined by ``/``), absolute or relative to ``base``. A malformed entry, and two that
    resolve to the same namespace, raise ConfigError naming ``what``.
    """
    body = text.strip()
    if body.startswith('[') and body.endswith(']'):
        body = body[1:-1].strip()
    if not body:
        return ()
    out: list[str] = []
    for item in body.split(','):
        name = item.strip().strip('\'"')
        relative = name[1:] if name.startswith('/') else name
        if not all(_NAME_TOKEN.fullmatch(t) for t in relative.split('/')):
            raise ConfigError(f'{what}: {name!r} is not a namespace (letters, digits and _, not '
                              f'starting with a digit, joined by /) in {text!r}')
        resolved = name if name.startswith('/') else '/' + arm_namespace(base, name)
        if resolved in out:
            raise ConfigError(f'{what}: {resolved} appears twice in {text!r}')
        out.append(resolved)
    return tuple(out)


def arm_namespace(arm: str, namespace: str) -> str:
    """One arm's namespace: ``<arm>/<namespace>`` (either may be empty), no end slashes."""
    return '/'.join(part for part in (arm.strip('/'), namespace.strip('/')) if part)


def arm_topic(arm: str, topic: str) -> str:
    """An external topic of one arm: ``/<arm><topic>`` for an absolute topic, else ``topic``."""
    return f'/{arm}{topic}' if arm and topic.startswith('/') else topic


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
    """The nodes to start for the given launch arguments, in start order.

    One arm: camera, VLA, safety (and simulated arm) nodes. With ``robots``: every arm's camera
    nodes, then the one VLA node (its ``arms`` parameter lists the arms' namespaces), then every
    arm's safety nodes and simulated arms.
    """
    args = resolve_arguments(values)
    cfg = config_dir()
    robots = tuple(name[1:] for name in parse_namespaces(args['robots']))
    per_arm = [_arm_specs(args, cfg, arm) for arm in robots or ('',)]
    vla_parameters: dict[str, object] = {
        'model_path': args['model_path'], 'unnorm_key': args['unnorm_key'],
        'quantization': args['quantization'], 'device': args['device']}
    if robots:
        vla_parameters['arms'] = ','.join(
            '/' + arm_namespace(arm, args['namespace']) for arm in robots)
    vla = NodeSpec('vla_node', 'vla_ros.nodes.vla_node', str(cfg / 'vla_node.yaml'),
                   remappings=(('diagnostics', '/diagnostics'),), parameters=vla_parameters)
    specs = [arm['camera_node'] for arm in per_arm] + [vla] + [
        arm[name] for name in ('safety_node', 'sim_arm_node') for arm in per_arm if name in arm]
    return [s for s in specs if s.name in ROLES[args['role']]]


def _arm_specs(args: Mapping[str, str], cfg: Path, arm: str) -> dict[str, NodeSpec]:
    """The nodes of one arm (``arm`` '' for the single-arm layout), by name."""
    def external(topic: str) -> str:
        return arm_topic(arm, topic)

    camera_topic = external(args['camera_topic'])
    specs = {
        'camera_node': NodeSpec(
            'camera_node', 'vla_ros.nodes.camera_node', str(cfg / 'camera_node.yaml'),
            parameters={'image_transport': args['camera_transport']},
            remappings=(('image', camera_topic),), arm=arm),
        'safety_node': NodeSpec(
            'safety_node', 'vla_ros.nodes.safety_node',
            args['safety_config'] or str(cfg / 'safety_node.yaml'),
            parameters={'output_mode': args['output_mode']},
            remappings=(('twist', external(args['servo_topic'])),
                        ('pose_target', external('/servo_node/pose_target_cmds')),
                        ('joint_states', external(args['joint_states_topic'])),
                        ('wrench', external('/wrench')),  # the arm's tool wrench (contact stop)
                        ('diagnostics', '/diagnostics')), arm=arm),
    }
    if args['use_sim'] == 'true':
        ns = specs['camera_node'].namespace_in(args['namespace'])
        specs['sim_arm_node'] = NodeSpec(
            'sim_arm_node', 'vla_ros.nodes.sim_arm_node', str(cfg / 'sim_arm_node.yaml'),
            remappings=(('image_raw', camera_topic),
                        ('joint_states', external(args['joint_states_topic'])),
                        ('twist', external(args['servo_topic'])),
                        ('gripper_command', ns_topic(ns, 'gripper_command')),
                        ('episode', ns_topic(ns, 'episode')),
                        ('ee_pose', external('/sim/ee_pose')),
                        ('task_success', external('/sim/task_success')),
                        ('world_state', external('/sim/world_state'))),
            namespaced=False, arm=arm)
    return specs


def ros_args(spec: NodeSpec, namespace: str, log_level: str = 'info') -> list[str]:
    """Command-line ``--ros-args`` for ``spec`` (what launch_ros would pass)."""
    out = ['--ros-args', '-r', f'__node:={spec.name}', '--log-level', log_level]
    ns = spec.namespace_in(namespace)
    if ns:
        out += ['-r', f'__ns:=/{ns}']
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
