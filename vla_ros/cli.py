"""``vla-ros``: the pip-path runner and operator commands, for machines without ``ros2 launch``.

    vla-ros bringup [--sim] [--arg name:=value ...]   start the node list of vla_ros.bringup
    vla-ros instruct "pick up the bowl"              publish the instruction (latched)
    vla-ros estop | reset                            latch / clear the safety node's e-stop
    vla-ros status [--once]                          live rates, latency and safety state
    vla-ros eval --sim --episodes N                  closed-loop success rates (vla_ros.eval)
    vla-ros shadow-report AUDIT_LOG [--json]          shadow mode: would-be vs reference commands

``bringup`` starts the same nodes, parameter files and remappings as ``bringup.launch.py`` (both
read :func:`vla_ros.bringup.node_specs`), each as its own process with its log lines prefixed by
the node name; Ctrl-C stops all of them, and when one dies the rest are stopped and the exit
status names it.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from vla_ros.bringup import (
    LAUNCH_ARGUMENTS,
    NodeSpec,
    arm_namespace,
    arm_topic,
    config_dir,
    node_specs,
    resolve_arguments,
    ros_args,
)
from vla_ros.core.errors import ConfigError


def _parse_assignments(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(':=')
        if not sep:
            raise ConfigError(f'launch arguments are name:=value, got {item!r}')
        out[name] = value
    return out


def _bringup_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(config_dir() / 'fastdds_shm.xml'))
    env['PYTHONUNBUFFERED'] = '1'
    return env


def die_with_parent() -> None:
    """In the child, before exec: get SIGINT if the parent dies (Linux), so no node outlives it."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        try:
            return f'was killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'was killed by signal {-code}'
    return f'exited with code {code}'


class Bringup:
    """The node processes of one bringup, their prefixed logs and their shutdown.

    Output lines go to stdout prefixed with the node's label (``arm1/camera_node`` with
    ``robots``), or to ``sink(label, line)``; ``procs`` is keyed by label.
    ``pump`` must be called regularly (from one thread) so that no node blocks on a full pipe.
    """

    def __init__(self, specs: Sequence[NodeSpec], namespace: str, log_level: str,
                 env: dict[str, str], sink: Callable[[str, str], None] | None = None) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self._sink = sink
        self._width = max(len(s.label) for s in specs)
        self._sel = selectors.DefaultSelector()
        self._partial: dict[str, bytes] = {}
        try:
            for spec in specs:
                cmd = [sys.executable, '-m', spec.module, *ros_args(spec, namespace, log_level)]
                proc = subprocess.Popen(
                    cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the runner only
                    preexec_fn=die_with_parent if sys.platform == 'linux' else None)
                self.procs[spec.label] = proc
                os.set_blocking(proc.stdout.fileno(), False)
                self._sel.register(proc.stdout, selectors.EVENT_READ, spec.label)
                self._partial[spec.label] = b''
        except BaseException:
            self.stop()
            raise

    def pids(self) -> str:
        """``name (pid N), ...`` of the started nodes."""
        return ', '.join(f'{name} (pid {proc.pid})' for name, proc in self.procs.items())

    def _write(self, name: str, line: bytes) -> None:
        text = line.decode(errors='replace')
        if self._sink is not None:
            self._sink(name, text)
        else:
            sys.stdout.write(f'[{name:<{self._width}}] {text}\n')

    def pump(self, timeout: float) -> None:
        """Copy available node output to stdout, each line prefixed with its node name."""
        if not self._sel.get_map():
            time.sleep(timeout)
            return
        for key, _ in self._sel.select(timeout):
            name = key.data
            try:
                chunk = key.fileobj.read()
            except (BlockingIOError, ValueError):
                continue
            if chunk is None:  # nothing after all (non-blocking read)
                continue
            if not chunk:  # end of file: the node closed its output
                self._sel.unregister(key.fileobj)
                if self._partial[name]:
                    self._write(name, self._partial[name])
                    self._partial[name] = b''
                continue
            data = self._partial[name] + chunk
            *lines, self._partial[name] = data.split(b'\n')
            for line in lines:
                self._write(name, line)
        sys.stdout.flush()

    def dead(self) -> tuple[str, int] | None:
        """The first node that exited, with its exit code, or None while all run."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT every node, wait (printing their last words), then SIGKILL what is left."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            self.pump(0.05)
        for name, proc in self.procs.items():
            if proc.poll() is None:
                print(f'[bringup] {name} ignored SIGINT for {timeout:.0f} s; killing it',
                      file=sys.stderr, flush=True)
                proc.kill()
                proc.wait()
        end = time.monotonic() + 1.0  # the rest of their output, up to end of file
        while self._sel.get_map() and time.monotonic() < end:
            self.pump(0.05)
        for proc in self.procs.values():
            proc.stdout.close()


def cmd_bringup(opts: argparse.Namespace) -> int:
    """Start the node list; return 0 on Ctrl-C/--duration, 1 when a node dies."""
    values = _parse_assignments(opts.arg)
    if opts.sim:
        values['use_sim'] = 'true'
    for name in ('model_path', 'unnorm_key', 'quantization', 'namespace'):
        value = getattr(opts, name)
        if value is not None:
            values[name] = value
    args = resolve_arguments(values)
    specs = node_specs(args)
    if args['rviz'] == 'true':
        print(f'[bringup] rviz:=true: rviz2 is started by ros2 launch only; on a ROS install '
              f'run: rviz2 -d {config_dir() / "vla.rviz"}', flush=True)
    # Handlers first: a Ctrl-C while the nodes start must still stop the ones already running.
    stop_requested: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    bringup = Bringup(specs, args['namespace'], args['log_level'], _bringup_env())
    print(f'[bringup] started {bringup.pids()} in namespace /{args["namespace"].strip("/")}',
          flush=True)
    monitor = None
    deadline = time.monotonic() + opts.duration if opts.duration else None
    code = 0
    try:
        if opts.instruction or not opts.quiet:
            from vla_ros.monitor import Monitor
            # With robots, the status lines and --instruction follow the first arm.
            arm = next((s.arm for s in specs if s.arm), '')
            if arm:
                print(f'[bringup] status lines and instructions: arm {arm} (the others: '
                      f'vla-ros status/instruct --namespace <arm>/{args["namespace"]})',
                      flush=True)
            monitor = Monitor(arm_namespace(arm, args['namespace']),
                              instructions=opts.instruction,
                              joint_states_topic=arm_topic(arm, args['joint_states_topic']),
                              twist_topic=arm_topic(arm, args['servo_topic']),
                              save_frames=opts.save_frames,
                              camera_topic=arm_topic(arm, args['camera_topic']),
                              quiet=opts.quiet)
        while not stop_requested:
            bringup.pump(0.1)
            if monitor is not None:
                monitor.spin_once()
            dead = bringup.dead()
            if dead is not None:
                name, rc = dead
                print(f'[bringup] {name} {describe_exit(rc)}; stopping the others',
                      file=sys.stderr, flush=True)
                code = 1
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f'[bringup] --duration {opts.duration} s reached; stopping', flush=True)
                break
        if stop_requested:
            print(f'[bringup] {signal.Signals(stop_requested[0]).name}: stopping', flush=True)
    finally:
        if monitor is not None:
            monitor.close()
        bringup.stop()
    print('[bringup] all nodes stopped' + (f' ({name} {describe_exit(rc)})' if code else ''),
          flush=True)
    return code


def cmd_instruct(opts: argparse.Namespace) -> int:
    """Publish the instruction latched; wait until the camera and safety nodes have it."""
    from vla_ros.monitor import publish_instruction
    return publish_instruction(opts.namespace, opts.text, timeout=opts.timeout)


def cmd_trigger(opts: argparse.Namespace) -> int:
    """Call the safety node's ~/estop or ~/reset service."""
    from vla_ros.monitor import call_trigger
    return call_trigger(opts.namespace, opts.command, timeout=opts.timeout)


def cmd_status(opts: argparse.Namespace) -> int:
    """Print live rates, latency and safety state."""
    from vla_ros.monitor import Monitor
    monitor = Monitor(opts.namespace, joint_states_topic=opts.joint_states_topic,
                      twist_topic=opts.twist_topic, period=opts.period, quiet=opts.once)
    try:
        if opts.once:  # one line, after one period of listening
            time.sleep(opts.period)
            print(monitor.line(), flush=True)
        while not opts.once:
            monitor.spin_once(opts.period)
    except KeyboardInterrupt:
        pass
    finally:
        monitor.close()
    return 0


def cmd_shadow_report(opts: argparse.Namespace) -> int:
    """Print the shadow-mode comparison recomputed from a safety node audit log."""
    from vla_ros.core.safety.shadow import format_report, read_audit
    try:
        summary = read_audit(opts.audit_log)
    except OSError as exc:
        print(f'vla-ros shadow-report: cannot read {opts.audit_log}: {exc}', file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if opts.json else format_report(summary))
    return 0 if summary['actions'] else 1


def cmd_eval(opts: argparse.Namespace) -> int:
    """Closed-loop evaluation on the simulated arm (``vla_ros.eval`` parses its own options)."""
    from vla_ros.eval import main as eval_main
    return eval_main(opts.eval_args, prog='vla-ros eval')


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    """``vla-ros eval``: options are forwarded untouched, so torch & co. load only when used."""
    e = sub.add_parser('eval', add_help=False, prefix_chars='+',
                       help='closed-loop success rates on the simulated arm: '
                            'vla-ros eval --sim --episodes N (see vla-ros eval --help)')
    e.add_argument('eval_args', nargs='*')
    e.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``vla-ros`` argument parser."""
    parser = argparse.ArgumentParser(prog='vla-ros', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    b = sub.add_parser('bringup', help='start the VLA graph (same nodes as bringup.launch.py)')
    b.add_argument('--sim', action='store_true', help='with the simulated arm and camera')
    b.add_argument('--model-path', dest='model_path')
    b.add_argument('--unnorm-key', dest='unnorm_key')
    b.add_argument('--quantization', choices=('none', 'int4'))
    b.add_argument('--namespace')
    b.add_argument('--arg', action='append', default=[], metavar='NAME:=VALUE',
                   help='any launch argument: ' + ', '.join(a.name for a in LAUNCH_ARGUMENTS))
    b.add_argument('--instruction', action='append', default=[],
                   help='publish this instruction once the graph is up; repeat the option '
                        'for a sequence (the next goes out when the arm comes to rest or after '
                        '20 s, starting over after the last)')
    b.add_argument('--duration', type=float, default=0.0,
                   help='stop after this many seconds (0 = until Ctrl-C)')
    b.add_argument('--save-frames', dest='save_frames', metavar='DIR',
                   help='save a camera frame per second as PNG into DIR')
    b.add_argument('--quiet', action='store_true', help='no status lines')
    b.set_defaults(func=cmd_bringup)

    i = sub.add_parser('instruct', help='publish an instruction (latched)')
    i.add_argument('text')
    i.add_argument('--namespace', default='vla')
    i.add_argument('--timeout', type=float, default=10.0)
    i.set_defaults(func=cmd_instruct)

    for name, text in (('estop', 'latch the e-stop'), ('reset', 'clear a latched e-stop')):
        t = sub.add_parser(name, help=text)
        t.add_argument('--namespace', default='vla')
        t.add_argument('--timeout', type=float, default=10.0)
        t.set_defaults(func=cmd_trigger)

    s = sub.add_parser('status', help='live rates, latency and safety state')
    s.add_argument('--namespace', default='vla')
    s.add_argument('--joint-states-topic', dest='joint_states_topic', default='/joint_states')
    s.add_argument('--twist-topic', dest='twist_topic', default='/servo_node/delta_twist_cmds')
    s.add_argument('--period', type=float, default=1.0)
    s.add_argument('--once', action='store_true')
    s.set_defaults(func=cmd_status)

    r = sub.add_parser('shadow-report', help='shadow mode: the would-be commands of an audit log '
                       'compared with the reference twist')
    r.add_argument('audit_log', help="the safety node's audit_log file (JSON lines)")
    r.add_argument('--json', action='store_true', help='print the figures as JSON')
    r.set_defaults(func=cmd_shadow_report)

    _add_eval_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vla-ros``."""
    opts = build_parser().parse_args(argv)
    try:
        return int(opts.func(opts) or 0)
    except ConfigError as exc:
        print(f'vla-ros: {exc}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
