"""Structure of ``launch/bringup.launch.py`` and its drift against the runner, scripts and configs.

``launch``/``launch_ros`` exist only on a ROS install (no registry carries them), so most tests
here import the launch file with small stand-in modules put in ``sys.modules`` in place of
``launch``, ``launch.actions``, ``launch.substitutions``, ``launch_ros`` and
``launch_ros.actions``. The stand-ins do nothing but record what the file constructs (class name,
positional and keyword arguments); ``LaunchConfiguration`` and ``EnvironmentVariable`` also
resolve against a fake context, the way launch does. This is a deliberate, narrow fake: it
proves which arguments are declared and which nodes are created with which package, executable,
name, namespace, parameters and remappings for given argument values -- and that these equal
``vla_ros.bringup.node_specs`` and the runner's ``--ros-args`` -- not that launch_ros accepts
them. That part is ``test_real_launch_description``, skipped here, run on a ROS install.

The drift tests need no launch at all: every executable of the node list has a script under
``scripts/`` that runs the node's module and is installed by ``CMakeLists.txt``, and every
``config/<node>.yaml`` holds exactly the node's declared parameters with the same defaults and
types (a ``5`` where the node declares ``5.0`` would fail at start-up with a type error).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from vla_ros import cli
from vla_ros.bringup import (
    LAUNCH_ARGUMENTS,
    PACKAGE,
    NodeSpec,
    config_dir,
    node_specs,
    ros_args,
)
from vla_ros.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILE = ROOT / 'launch' / 'bringup.launch.py'
NODES = ('camera_node', 'vla_node', 'safety_node', 'sim_arm_node')

#: Argument sets whose node lists must agree between the launch file, node_specs and the runner.
ARGUMENT_SETS = {
    'defaults': {},
    'sim': {'use_sim': 'true'},
    'sim-namespace-camera': {'use_sim': 'true', 'namespace': 'left_arm',
                             'camera_topic': '/left/camera/image_raw'},
    'model-and-topics': {'model_path': '/models/openvla-7b', 'unnorm_key': 'bridge_orig',
                         'quantization': 'int4', 'device': 'cuda:1', 'output_mode': 'pose',
                         'safety_config': '/etc/robot/safety.yaml',
                         'servo_topic': '/arm/servo_node/delta_twist_cmds',
                         'joint_states_topic': '/arm/joint_states', 'log_level': 'debug'},
    'empty-namespace-sim': {'use_sim': 'true', 'namespace': ''},
    'robots-sim': {'use_sim': 'true', 'robots': 'arm1,arm2,arm3'},
    'robots-brackets-robot-role': {'use_sim': 'true', 'robots': '[left, right]',
                                   'role': 'robot', 'namespace': 'cell/vla'},
    'robots-inference-role': {'robots': 'arm1,arm2', 'role': 'inference',
                              'namespace': ''},
}


# ------------------------------------------------------------------------------ stand-ins
class Recorded:
    """A stand-in for any launch class: keeps the arguments it was constructed with."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs


class LaunchConfiguration(Recorded):
    """Resolves like launch's: the value of the named argument in the context."""

    def perform(self, context: types.SimpleNamespace) -> str:
        return context.launch_configurations[self.args[0]]


class EnvironmentVariable(Recorded):
    """Resolves like launch's: the variable in the context's environment, else the default."""

    def perform(self, context: types.SimpleNamespace) -> str:
        return context.environment.get(self.args[0], self.kwargs.get('default_value', ''))


def _stub_module(name: str, known: dict[str, type]) -> types.ModuleType:
    """A module whose every other attribute is a fresh recording class of that name."""
    module = types.ModuleType(name)
    module.__dict__.update(known)

    def __getattr__(attr: str) -> type:  # noqa: N807 - the module hook (PEP 562)
        if attr.startswith('__'):
            raise AttributeError(attr)
        cls = type(attr, (Recorded,), {})
        setattr(module, attr, cls)
        return cls

    module.__getattr__ = __getattr__
    return module


def _load_launch_file(name: str = 'vla_ros_bringup_launch') -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stub_launch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.ModuleType:
    """The launch file, imported against the recording stand-ins and a stand-in install."""
    known = {'LaunchConfiguration': LaunchConfiguration,
             'EnvironmentVariable': EnvironmentVariable}
    for name in ('launch', 'launch.actions', 'launch.conditions', 'launch.substitutions',
                 'launch_ros', 'launch_ros.actions'):
        monkeypatch.setitem(sys.modules, name, _stub_module(name, known))
    module = _load_launch_file()
    module.get_package_prefix = _fake_index(tmp_path, INSTALLED_VIEWERS | {PACKAGE})
    return module


#: What the stand-in install holds besides vla_ros (a ROS desktop install).
INSTALLED_VIEWERS = {'rviz2', 'robot_state_publisher'}


def _fake_index(root: Path, packages: set[str], skip: str = ''):  # noqa: ANN202
    """``get_package_prefix`` of an install under ``root`` holding ``packages`` (each with its
    executables in ``lib/<package>/``, except ``skip``)."""
    from ament_index_python.packages import PackageNotFoundError

    executables = {PACKAGE: [s.executable for s in node_specs({'use_sim': 'true'})],
                   'rviz2': ['rviz2'], 'robot_state_publisher': ['robot_state_publisher']}
    for package in packages:
        for exe in executables[package]:
            path = root / package / 'lib' / package / exe
            path.parent.mkdir(parents=True, exist_ok=True)
            if exe != skip and not path.exists():
                path.write_text('#!/bin/sh\n')
                path.chmod(0o755)

    def get_package_prefix(package: str) -> str:
        if package not in packages:
            raise PackageNotFoundError(f"package '{package}' not found")
        return str(root / package)
    return get_package_prefix


class Launched:
    """What the launch file constructs for ``values`` over the declared defaults."""

    def __init__(self, module: types.ModuleType, values: dict[str, str],
                 environ: dict[str, str] | None = None) -> None:
        self.description = module.generate_launch_description()
        assert type(self.description).__name__ == 'LaunchDescription'
        (self.entities,) = self.description.args
        self.declared = {e.args[0]: e for e in self._of('DeclareLaunchArgument')}
        context = types.SimpleNamespace(environment=dict(environ or {}),
                                        launch_configurations={})
        for name, decl in self.declared.items():
            context.launch_configurations[name] = decl.kwargs['default_value']
        context.launch_configurations.update(values)
        for action in self._of('SetEnvironmentVariable'):
            name, value = action.args
            context.environment[name] = value.perform(context) if hasattr(value, 'perform') \
                else value
        self.environment = context.environment
        (opaque,) = self._of('OpaqueFunction')
        self.actions = list(opaque.kwargs['function'](context))
        for action in self.actions:
            assert type(action).__name__ == 'Node', action

    def _of(self, kind: str) -> list[Recorded]:
        return [e for e in self.entities if type(e).__name__ == kind]

    def nodes(self, package: str = PACKAGE) -> list[Recorded]:
        return [a for a in self.actions if a.kwargs['package'] == package]


def _parse_ros_args(argv: list[str]) -> dict[str, object]:
    """Name, namespace, parameter files, -p values, remaps and log level from ``--ros-args``."""
    assert argv[0] == '--ros-args'
    out: dict[str, object] = {'namespace': '', 'files': [], 'params': {}, 'remaps': []}
    it = iter(argv[1:])
    for flag in it:
        value = next(it)
        if flag == '--params-file':
            out['files'].append(value)
        elif flag == '--log-level':
            out['log_level'] = value
        elif flag == '-p':
            key, _, literal = value.partition(':=')
            out['params'][key] = yaml.safe_load(literal)
        elif flag == '-r' and value.startswith('__node:='):
            out['name'] = value.split(':=', 1)[1]
        elif flag == '-r' and value.startswith('__ns:='):
            out['namespace'] = value.split(':=', 1)[1]
        elif flag == '-r':
            src, _, dst = value.partition(':=')
            out['remaps'].append((src, dst))
        else:
            raise AssertionError(f'unexpected ros argument {flag} {value}')
    return out


# ------------------------------------------------------------------------------ launch file
def test_every_launch_argument_is_declared_with_default_description_and_choices(
        stub_launch: types.ModuleType) -> None:
    launched = Launched(stub_launch, {})
    assert list(launched.declared) == [a.name for a in LAUNCH_ARGUMENTS]
    for arg in LAUNCH_ARGUMENTS:
        decl = launched.declared[arg.name]
        assert decl.kwargs['default_value'] == arg.default, arg.name
        assert decl.kwargs['description'] == arg.description and arg.description, arg.name
        if arg.choices:
            assert decl.kwargs['choices'] == list(arg.choices), arg.name
            assert arg.default in arg.choices, arg.name
        else:
            assert 'choices' not in decl.kwargs, arg.name
    # The arguments the issue names as public API are all there.
    assert {'model_path', 'unnorm_key', 'quantization', 'camera_topic', 'namespace', 'use_sim',
            'rviz', 'output_mode', 'safety_config'} <= set(launched.declared)


@pytest.mark.parametrize('values', ARGUMENT_SETS.values(), ids=ARGUMENT_SETS.keys())
def test_launched_nodes_equal_node_specs_and_the_runner(stub_launch: types.ModuleType,
                                                        values: dict[str, str]) -> None:
    launched = Launched(stub_launch, values)
    specs = node_specs(values)
    nodes = launched.nodes()
    assert [n.kwargs['name'] for n in nodes] == [s.name for s in specs]
    assert ('sim_arm_node' in [s.name for s in specs]) == (
        values.get('use_sim') == 'true' and values.get('role') != 'inference')
    namespace = values.get('namespace', 'vla')
    log_level = values.get('log_level', 'info')
    for node, spec in zip(nodes, specs, strict=True):
        kw = node.kwargs
        assert kw['package'] == PACKAGE
        assert kw['executable'] == spec.executable == spec.name
        assert kw['namespace'] == spec.namespace_in(namespace)
        overrides = [dict(spec.parameters)] if spec.parameters else []
        assert kw['parameters'] == [spec.params_file, *overrides]
        assert kw['remappings'] == list(spec.remappings)
        assert kw['arguments'] == ['--ros-args', '--log-level', log_level]
        # Like the runner, one node exiting ends the bringup, and the reason names it.
        assert type(kw['on_exit']).__name__ == 'Shutdown'
        assert kw['on_exit'].kwargs == {'reason': f'{spec.label} exited'}
        # The runner starts the same node with the same name, namespace, files and remaps.
        runner = _parse_ros_args(ros_args(spec, namespace, log_level))
        assert runner['name'] == kw['name']
        expected_ns = '/' + kw['namespace'] if kw['namespace'] else ''
        assert runner['namespace'] == expected_ns
        assert runner['files'] == [spec.params_file]
        assert runner['params'] == dict(spec.parameters)
        assert runner['remaps'] == kw['remappings']
        assert runner['log_level'] == log_level


def test_argument_values_reach_the_nodes(stub_launch: types.ModuleType) -> None:
    values = ARGUMENT_SETS['model-and-topics']
    nodes = {n.kwargs['name']: n.kwargs for n in Launched(stub_launch, values).nodes()}
    vla = nodes['vla_node']['parameters'][1]
    assert vla == {'model_path': '/models/openvla-7b', 'unnorm_key': 'bridge_orig',
                   'quantization': 'int4', 'device': 'cuda:1'}
    safety = nodes['safety_node']
    assert safety['parameters'] == ['/etc/robot/safety.yaml', {'output_mode': 'pose'}]
    assert ('twist', '/arm/servo_node/delta_twist_cmds') in safety['remappings']
    assert ('joint_states', '/arm/joint_states') in safety['remappings']
    assert nodes['camera_node']['remappings'] == [('image', '/camera/image_raw')]
    assert nodes['camera_node']['parameters'][1] == {'image_transport': 'raw'}
    compressed = {n.kwargs['name']: n.kwargs for n in Launched(
        stub_launch, {'camera_transport': 'compressed'}).nodes()}
    assert compressed['camera_node']['parameters'][1] == {'image_transport': 'compressed'}


def test_sim_arm_closes_the_loop_on_the_same_topics(stub_launch: types.ModuleType) -> None:
    values = ARGUMENT_SETS['sim-namespace-camera']
    nodes = {n.kwargs['name']: n.kwargs for n in Launched(stub_launch, values).nodes()}
    sim = dict(nodes['sim_arm_node']['remappings'])
    safety = dict(nodes['safety_node']['remappings'])
    assert sim['image_raw'] == dict(nodes['camera_node']['remappings'])['image'] \
        == '/left/camera/image_raw'
    assert sim['twist'] == safety['twist'] and sim['joint_states'] == safety['joint_states']
    assert sim['episode'] == '/left_arm/episode'
    assert sim['gripper_command'] == '/left_arm/gripper_command'
    # No namespace: the sim's absolute topics must still be valid names.
    empty = Launched(stub_launch, ARGUMENT_SETS['empty-namespace-sim']).nodes()
    sim = dict(empty[-1].kwargs['remappings'])
    assert sim['episode'] == '/episode' and sim['gripper_command'] == '/gripper_command'


def _resolve(namespace: str, topic: str) -> str:
    """A node's topic name as ROS resolves it (absolute stays, relative goes under namespace)."""
    return topic if topic.startswith('/') else '/' + '/'.join(p for p in (namespace, topic) if p)


def test_robots_one_vla_node_serves_every_arm_on_its_own_topics(
        stub_launch: types.ModuleType) -> None:
    values = ARGUMENT_SETS['robots-sim']
    nodes = Launched(stub_launch, values).nodes()
    fqns = [f"/{n.kwargs['namespace']}/{n.kwargs['name']}" for n in nodes]
    assert fqns == ['/arm1/vla/camera_node', '/arm2/vla/camera_node', '/arm3/vla/camera_node',
                    '/vla/vla_node',
                    '/arm1/vla/safety_node', '/arm2/vla/safety_node', '/arm3/vla/safety_node',
                    '/arm1/sim_arm_node', '/arm2/sim_arm_node', '/arm3/sim_arm_node']
    by_fqn = {fqn: n.kwargs for fqn, n in zip(fqns, nodes, strict=True)}
    vla = by_fqn['/vla/vla_node']
    assert vla['parameters'][1]['arms'] == '/arm1/vla,/arm2/vla,/arm3/vla'
    claimed: dict[str, str] = {}
    for arm in ('arm1', 'arm2', 'arm3'):
        ns = f'{arm}/vla'
        camera = dict(by_fqn[f'/{ns}/camera_node']['remappings'])
        safety = dict(by_fqn[f'/{ns}/safety_node']['remappings'])
        sim = dict(by_fqn[f'/{arm}/sim_arm_node']['remappings'])
        # The loop of each arm closes on that arm's topics only.
        assert sim['image_raw'] == camera['image'] == f'/{arm}/camera/image_raw'
        assert sim['twist'] == safety['twist'] == f'/{arm}/servo_node/delta_twist_cmds'
        assert sim['joint_states'] == safety['joint_states'] == f'/{arm}/joint_states'
        assert sim['episode'] == _resolve(ns, 'episode') == f'/{ns}/episode'
        assert sim['gripper_command'] == _resolve(ns, 'gripper_command')
        # The sim's relative wrench output lands where this arm's safety node reads it.
        assert _resolve(arm, 'wrench') == safety['wrench'] == f'/{arm}/wrench'
        assert sim['task_success'] == f'/{arm}/sim/task_success'
        # The VLA node's <arm>/observation and <arm>/action are this arm's camera/safety topics.
        assert f'/{ns}' in vla['parameters'][1]['arms'].split(',')
        for topic in [*camera.values(), *safety.values(), *sim.values()]:
            if topic != '/diagnostics':
                assert claimed.setdefault(topic, arm) == arm, f'{topic} shared by two arms'


def test_robots_composes_with_role_and_namespace(stub_launch: types.ModuleType) -> None:
    robot = Launched(stub_launch, ARGUMENT_SETS['robots-brackets-robot-role']).nodes()
    assert [(n.kwargs['namespace'], n.kwargs['name']) for n in robot] == [
        ('left/cell/vla', 'camera_node'), ('right/cell/vla', 'camera_node'),
        ('left/cell/vla', 'safety_node'), ('right/cell/vla', 'safety_node'),
        ('left', 'sim_arm_node'), ('right', 'sim_arm_node')]
    assert dict(robot[-1].kwargs['remappings'])['episode'] == '/right/cell/vla/episode'
    inference = Launched(stub_launch, ARGUMENT_SETS['robots-inference-role']).nodes()
    (vla,) = inference
    assert (vla.kwargs['namespace'], vla.kwargs['name']) == ('', 'vla_node')
    assert vla.kwargs['parameters'][1]['arms'] == '/arm1,/arm2'
    # One arm, robots unset or empty: exactly the single-arm layout, no arms parameter.
    for values in ({'use_sim': 'true'}, {'use_sim': 'true', 'robots': ''},
                   {'use_sim': 'true', 'robots': '[]'}):
        assert node_specs(values) == node_specs({'use_sim': 'true'})
    assert 'arms' not in dict(node_specs({'robots': ''})[1].parameters)


@pytest.mark.parametrize('robots', ['arm1,arm1', '1arm', 'arm1,,arm2', 'arm one', 'a/', '/'])
def test_bad_robots_are_refused_before_any_node(stub_launch: types.ModuleType,
                                                robots: str) -> None:
    with pytest.raises(ConfigError, match='robots'):
        Launched(stub_launch, {'robots': robots})
    with pytest.raises(ConfigError, match='robots'):
        node_specs({'robots': robots})


def test_runner_labels_every_node_of_every_arm_uniquely() -> None:
    specs = node_specs(ARGUMENT_SETS['robots-sim'])
    labels = [s.label for s in specs]
    assert len(set(labels)) == len(labels) == 10
    assert 'arm2/safety_node' in labels and 'vla_node' in labels
    # The runner's --ros-args of one arm's node carry that arm's namespace.
    (safety2,) = [s for s in specs if s.label == 'arm2/safety_node']
    assert _parse_ros_args(ros_args(safety2, 'vla'))['namespace'] == '/arm2/vla'
    (vla,) = [s for s in specs if s.name == 'vla_node']
    assert _parse_ros_args(ros_args(vla, 'vla'))['params']['arms'] == \
        '/arm1/vla,/arm2/vla,/arm3/vla'


def test_shared_memory_profile_on_both_paths(stub_launch: types.ModuleType,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    profile = str(config_dir() / 'fastdds_shm.xml')
    assert Path(profile).is_file()
    launched = Launched(stub_launch, {}, environ={})
    assert launched.environment['FASTDDS_DEFAULT_PROFILES_FILE'] == profile
    assert launched.environment['RMW_IMPLEMENTATION'] == 'rmw_fastrtps_cpp'
    monkeypatch.delenv('FASTDDS_DEFAULT_PROFILES_FILE', raising=False)
    monkeypatch.delenv('RMW_IMPLEMENTATION', raising=False)
    env = cli._bringup_env()
    assert env['FASTDDS_DEFAULT_PROFILES_FILE'] == profile
    assert env['RMW_IMPLEMENTATION'] == 'rmw_fastrtps_cpp'
    # A caller's own choice wins on both paths alike.
    own = {'FASTDDS_DEFAULT_PROFILES_FILE': '/etc/dds/site.xml',
           'RMW_IMPLEMENTATION': 'rmw_cyclonedds_cpp'}
    launched = Launched(stub_launch, {}, environ=own)
    for key, value in own.items():
        monkeypatch.setenv(key, value)
        assert launched.environment[key] == value == cli._bringup_env()[key]


@pytest.mark.parametrize('use_sim', ['false', 'true'])
def test_rviz_only_when_requested(stub_launch: types.ModuleType, use_sim: str) -> None:
    for rviz in ('false', 'true'):
        launched = Launched(stub_launch, {'rviz': rviz, 'use_sim': use_sim})
        viewers = {a.kwargs['package']: a.kwargs for a in launched.actions
                   if a.kwargs['package'] != PACKAGE}
        if rviz == 'false':
            assert viewers == {}
            continue
        assert viewers['rviz2']['executable'] == 'rviz2'
        assert viewers['rviz2']['arguments'] == ['-d', str(config_dir() / 'vla.rviz')]
        assert (config_dir() / 'vla.rviz').is_file()
        # The simulated arm has no driver to publish its model and TF: a state publisher does.
        assert ('robot_state_publisher' in viewers) == (use_sim == 'true')
        if use_sim == 'true':
            rsp = viewers['robot_state_publisher']
            urdf = (config_dir() / 'panda.urdf').read_text(encoding='utf-8')
            assert rsp['parameters'] == [{'robot_description': urdf}]
            assert rsp['remappings'] == [('joint_states', '/joint_states')]


@pytest.mark.parametrize('installed', [set(), {'rviz2'}, {'robot_state_publisher'}])
def test_missing_viewer_refuses_before_any_node_starts(stub_launch: types.ModuleType,
                                                       tmp_path: Path,
                                                       installed: set[str]) -> None:
    stub_launch.get_package_prefix = _fake_index(tmp_path / 'other', installed | {PACKAGE})
    # rviz2 alone is enough without the simulator (a real arm publishes its own model and TF).
    if 'rviz2' in installed:
        assert Launched(stub_launch, {'rviz': 'true'}).nodes()
    with pytest.raises(RuntimeError, match='no node was started') as refused:
        # The node actions are created only after the check: an exception here means launch
        # receives no action at all, so nothing is left running.
        Launched(stub_launch, {'rviz': 'true', 'use_sim': 'true'})
    for package in INSTALLED_VIEWERS - installed:
        assert package in str(refused.value)
    # Without rviz:=true nothing is required.
    assert len(Launched(stub_launch, {'use_sim': 'true'}).nodes()) == 4


def test_missing_executable_refuses_before_any_node_starts(stub_launch: types.ModuleType,
                                                          tmp_path: Path) -> None:
    # Real launch_ros looks up sim_arm_node only after starting the three nodes before it, then
    # ends the launch with those left running: the launch file checks them all first.
    stub_launch.get_package_prefix = _fake_index(tmp_path / 'broken', {PACKAGE},
                                                 skip='sim_arm_node')
    assert len(Launched(stub_launch, {}).nodes()) == 3
    with pytest.raises(RuntimeError, match='vla_ros/sim_arm_node; no node was started'):
        Launched(stub_launch, {'use_sim': 'true'})


def test_package_xml_declares_what_the_launch_file_starts() -> None:
    import xml.etree.ElementTree as ET
    root = ET.parse(ROOT / 'package.xml').getroot()
    run_deps = {e.text for e in root if e.tag in ('exec_depend', 'depend')}
    assert INSTALLED_VIEWERS | {'launch', 'launch_ros', 'ros2launch'} <= run_deps


def test_bad_choice_is_refused(stub_launch: types.ModuleType) -> None:
    with pytest.raises(ConfigError, match='quantization'):
        Launched(stub_launch, {'quantization': 'fp8'})


@pytest.mark.ros_install
@pytest.mark.skipif(importlib.util.find_spec('launch_ros') is None,
                    reason='launch_ros is not installed (it ships with a ROS 2 install only); '
                           'the stand-in tests in this file cover the launch file\'s structure')
def test_real_launch_description() -> None:  # pragma: no cover - needs a ROS install
    from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
    from launch.utilities import perform_substitutions
    from launch_ros.actions import Node

    from launch import LaunchContext, LaunchDescription, LaunchIntrospector, LaunchService

    description = _load_launch_file('vla_ros_bringup_launch_real').generate_launch_description()
    assert isinstance(description, LaunchDescription)
    context = LaunchContext()
    declared = {a.name: a for a in description.get_launch_arguments()}
    assert list(declared) == [a.name for a in LAUNCH_ARGUMENTS]
    for arg in LAUNCH_ARGUMENTS:
        decl = declared[arg.name]
        assert isinstance(decl, DeclareLaunchArgument)
        assert perform_substitutions(context, decl.default_value) == arg.default
        # launch appends the choices to the description: "<description>. Valid choices are: [...]"
        expected = arg.description
        if arg.choices:
            expected = expected.rstrip('.') + '. Valid choices are: ' + str(list(arg.choices))
        assert decl.description == expected
        assert list(decl.choices or []) == list(arg.choices)
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    try:
        for viewer in INSTALLED_VIEWERS:
            get_package_prefix(viewer)
        viewers = True
    except PackageNotFoundError:
        viewers = False
    values = {**{a.name: a.default for a in LAUNCH_ARGUMENTS}, **ARGUMENT_SETS['sim'],
              'rviz': 'true'}
    context.launch_configurations.update(values)
    for entity in description.entities:
        if isinstance(entity, SetEnvironmentVariable):
            entity.visit(context)
    assert context.environment['FASTDDS_DEFAULT_PROFILES_FILE'] == os.environ.get(
        'FASTDDS_DEFAULT_PROFILES_FILE', str(config_dir() / 'fastdds_shm.xml'))
    (opaque,) = [e for e in description.entities if isinstance(e, OpaqueFunction)]
    if not viewers:  # a ROS install without rviz2: refused before any node action exists
        with pytest.raises(RuntimeError, match='no node was started'):
            opaque.execute(context)
        values['rviz'] = 'false'
        context.launch_configurations.update(values)
    actions = opaque.execute(context)
    nodes = [a for a in actions if isinstance(a, Node) and a.node_package == PACKAGE]
    specs = node_specs(values)
    assert [n.node_executable for n in nodes] == [s.executable for s in specs]
    for node, spec in zip(nodes, specs, strict=True):
        node._perform_substitutions(context)  # what execute() does before starting it
        ns = spec.namespace_in(values['namespace'])
        assert node.node_name == ('/' + ns if ns else '') + f'/{spec.name}'
        assert list(node.expanded_remapping_rules) == list(spec.remappings)
    assert {a.node_package for a in actions} == (
        {PACKAGE, *INSTALLED_VIEWERS} if viewers else {PACKAGE})
    # Dry introspection: the description formats and a launch service accepts it (not run).
    assert 'OpaqueFunction' in LaunchIntrospector().format_launch_description(description)
    service = LaunchService(argv=[])
    service.include_launch_description(description)


# ------------------------------------------------------------------------------ drift
def _installed_programs() -> list[str]:
    text = (ROOT / 'CMakeLists.txt').read_text(encoding='utf-8')
    match = re.search(r'install\(\s*PROGRAMS(.*?)DESTINATION\s+lib/\$\{PROJECT_NAME\}', text,
                      re.S)
    assert match, 'CMakeLists.txt installs no PROGRAMS into lib/${PROJECT_NAME}'
    return match.group(1).split()


@pytest.mark.parametrize('spec', node_specs({'use_sim': 'true'}), ids=lambda s: s.name)
def test_every_executable_has_an_installed_script(spec: NodeSpec) -> None:
    script = ROOT / 'scripts' / spec.executable
    assert script.is_file(), f'{script} missing: ros2 launch could not start {spec.name}'
    assert os.access(script, os.X_OK), f'{script} is not executable'
    text = script.read_text(encoding='utf-8')
    assert text.startswith('#!/usr/bin/env python3')
    # The launch path runs the script, the runner ``python -m module``: the same main().
    assert f'from {spec.module} import main' in text
    assert f'scripts/{spec.executable}' in _installed_programs()


def test_node_list_covers_every_node_module() -> None:
    assert sorted(s.name for s in node_specs({'use_sim': 'true'})) == sorted(NODES)


def _yaml_parameters(path: str, node: str) -> dict[str, object]:
    data = yaml.safe_load(Path(path).read_text(encoding='utf-8'))
    assert list(data) == [f'/**/{node}'], f'{path}: parameters must be keyed by /**/{node}'
    return data[f'/**/{node}']['ros__parameters']


@pytest.mark.parametrize('node', NODES)
def test_params_file_mirrors_declared_parameters(node: str) -> None:
    (spec,) = [s for s in node_specs({'use_sim': 'true'}) if s.name == node]
    assert Path(spec.params_file) == config_dir() / f'{node}.yaml'
    params = importlib.import_module(f'vla_ros.nodes.{node}').PARAMS
    declared = {p.name: p.default for p in params}
    in_file = _yaml_parameters(spec.params_file, node)
    assert sorted(in_file) == sorted(declared), (
        f'config/{node}.yaml drifted: missing {sorted(set(declared) - set(in_file))}, '
        f'unknown {sorted(set(in_file) - set(declared))}')
    for name, default in declared.items():
        value = in_file[name]
        assert value == default, f'config/{node}.yaml {name}: {value!r} != default {default!r}'
        assert type(value) is type(default), f'{node}.{name}: {type(value)} vs {type(default)}'
        if isinstance(default, list):
            assert [type(v) for v in value] == [type(v) for v in default], name
    # Launch overrides name real parameters of the node.
    assert set(spec.parameters) <= set(declared)


# ------------------------------------------------------------------------------ viewers, Servo
def _safety_default(name: str) -> object:
    from vla_ros.nodes.safety_node import PARAMS
    return {p.name: p.default for p in PARAMS}[name]


def test_rviz_config_shows_the_graph() -> None:
    config = yaml.safe_load((config_dir() / 'vla.rviz').read_text(encoding='utf-8'))
    manager = config['Visualization Manager']
    assert manager['Global Options']['Fixed Frame'] == _safety_default('frame_id')
    shown = {(d['Class'].rsplit('/', 1)[-1], d.get('Topic', d.get('Description Topic', {}))
              .get('Value')) for d in manager['Displays']}
    assert {('Image', '/vla/debug_image'), ('Image', '/camera/image_raw'),
            ('MarkerArray', '/vla/markers'), ('RobotModel', '/robot_description'),
            ('TF', None)} <= shown
    images = [d for d in manager['Displays'] if d['Class'].endswith('/Image')]
    # The camera topic is best effort: a reliable subscription would never match it.
    assert {d['Topic']['Reliability Policy'] for d in images} == {'Best Effort'}


def test_servo_config_matches_the_safety_node() -> None:
    data = yaml.safe_load((config_dir() / 'servo.yaml').read_text(encoding='utf-8'))
    servo = data['/**/servo_node']['ros__parameters']['moveit_servo']
    assert servo['command_in_type'] == 'speed_units'  # the twist is in m/s and rad/s
    (safety,) = [s for s in node_specs() if s.name == 'safety_node']
    assert servo['cartesian_command_in_topic'] == dict(safety.remappings)['twist'] \
        == '/servo_node/delta_twist_cmds'
    assert servo['planning_frame'] == _safety_default('frame_id')
    assert servo['ee_frame'] == _safety_default('ee_frame')
    assert servo['joint_topic'] == '/joint_states'
    assert servo['scale'] == {'linear': 1.0, 'rotational': 1.0, 'joint': 1.0}
    timeout = servo['incoming_command_timeout']
    assert timeout > _safety_default('action_period')  # above the policy period
    assert timeout > 5.0 / _safety_default('output_rate_hz')  # tolerates missed re-publications
    assert 0.0 < servo['publish_period'] < 1.0 / _safety_default('output_rate_hz')
    # output_mode:=pose: the safety node's pose target goes where Servo reads pose commands.
    assert servo['pose_command_in_topic'] == dict(safety.remappings)['pose_target'] \
        == '/servo_node/pose_target_cmds'
    doc = (ROOT / 'docs' / 'servo_and_gripper.md').read_text(encoding='utf-8')
    pose_part = doc[doc.index('**Pose targets instead of twists.**'):]
    assert servo['pose_command_in_topic'] in pose_part.split('\n\n')[0]
