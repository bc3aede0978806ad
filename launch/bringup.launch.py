"""Bring up the VLA graph: camera -> VLA -> safety limiter (-> simulated arm with use_sim:=true).

Every tunable is a launch argument declared from ``vla_ros.bringup.LAUNCH_ARGUMENTS``; the node
list, parameter files and remappings come from ``vla_ros.bringup.node_specs`` -- the same list
the pip-path runner (``vla-ros bringup``) starts, so the two cannot drift; as with the runner,
one node exiting ends the whole bringup. Only the viewers are launch-only: rviz2 with
``config/vla.rviz`` (rviz:=true) and, for the simulated arm, a robot_state_publisher so that
rviz2 has the robot model and TF. Both are exec_depends of the package; when one of them, or
one of this package's executables, is missing anyway, the launch refuses before it starts any
node (no half-started graph).

    ros2 launch vla_ros bringup.launch.py model_path:=/models/openvla-7b unnorm_key:=bridge_orig
"""

import os
from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_prefix
from launch.actions import (
    DeclareLaunchArgument,
    OpaqueFunction,
    SetEnvironmentVariable,
    Shutdown,
)
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from vla_ros.bringup import LAUNCH_ARGUMENTS, PACKAGE, config_dir, node_specs, resolve_arguments


def _refuse_missing(values: dict[str, str]) -> None:
    """Refuse before any node starts when an executable the arguments need is not installed.

    launch_ros looks an executable up only when its Node action runs, after the actions before
    it have started their processes; a missing one then ends the launch with those processes
    left running. So every executable (``<prefix>/lib/<package>/<executable>``) is checked
    first, this package's and the viewers' alike.
    """
    wanted = [(PACKAGE, spec.executable) for spec in node_specs(values)]
    if values['rviz'] == 'true':
        wanted.append(('rviz2', 'rviz2'))
        if values['use_sim'] == 'true':
            wanted.append(('robot_state_publisher', 'robot_state_publisher'))
    missing = []
    for package, executable in wanted:
        try:
            path = Path(get_package_prefix(package)) / 'lib' / package / executable
        except PackageNotFoundError:
            missing.append(package)
            continue
        if not os.access(path, os.X_OK):
            missing.append(f'{package}/{executable}')
    if missing:
        hint = ' '.join(f'ros-$ROS_DISTRO-{m.replace("_", "-")}' for m in missing if '/' not in m)
        raise RuntimeError(
            f'not installed: {", ".join(missing)}' + (f' (apt install {hint})' if hint else '')
            + '; no node was started')


def _nodes(context, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - launch's hook
    """Create the nodes once the argument values are known (launch calls this)."""
    values = resolve_arguments(
        {a.name: LaunchConfiguration(a.name).perform(context) for a in LAUNCH_ARGUMENTS})
    _refuse_missing(values)
    namespace = values['namespace']
    actions = []
    for spec in node_specs(values):
        actions.append(Node(
            package=PACKAGE,
            executable=spec.executable,
            name=spec.name,
            namespace=spec.namespace_in(namespace),
            # No empty override dict: it would become an empty parameter file.
            parameters=[spec.params_file] + ([dict(spec.parameters)] if spec.parameters else []),
            remappings=list(spec.remappings),
            arguments=['--ros-args', '--log-level', values['log_level']],
            output='screen',
            emulate_tty=True,
            # Like the runner: when one node of the graph exits, the bringup ends.
            on_exit=Shutdown(reason=f'{spec.label} exited'),
        ))
    if values['rviz'] == 'true':
        actions.append(Node(package='rviz2', executable='rviz2', name='rviz2',
                            arguments=['-d', str(config_dir() / 'vla.rviz')], output='screen'))
        if values['use_sim'] == 'true':  # a real arm's driver publishes its own model and TF
            urdf = (config_dir() / 'panda.urdf').read_text(encoding='utf-8')
            actions.append(Node(package='robot_state_publisher',
                                executable='robot_state_publisher',
                                name='robot_state_publisher',
                                parameters=[{'robot_description': urdf}],
                                remappings=[('joint_states', values['joint_states_topic'])],
                                output='screen'))
    return actions


def generate_launch_description() -> LaunchDescription:
    """Declare the arguments, select the shared-memory profile, then create the nodes."""
    declared = [
        DeclareLaunchArgument(a.name, default_value=a.default, description=a.description,
                              **({'choices': list(a.choices)} if a.choices else {}))
        for a in LAUNCH_ARGUMENTS
    ]
    # Like the runner: the caller's own setting wins, else the package's profile and Fast DDS.
    shm_profile = str(config_dir() / 'fastdds_shm.xml')
    return LaunchDescription([
        *declared,
        SetEnvironmentVariable('FASTDDS_DEFAULT_PROFILES_FILE', EnvironmentVariable(
            'FASTDDS_DEFAULT_PROFILES_FILE', default_value=shm_profile)),
        SetEnvironmentVariable('RMW_IMPLEMENTATION', EnvironmentVariable(
            'RMW_IMPLEMENTATION', default_value='rmw_fastrtps_cpp')),
        OpaqueFunction(function=_nodes),
    ])
