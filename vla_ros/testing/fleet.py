"""The two-host graph of the fleet test and benchmark: robot host and inference host over DDS.

``TwoHostGraph`` starts, on a :class:`vla_ros.testing.netns.Lan`, the Fast DDS discovery server
(``fastdds discovery``) and the robot side (``vla-ros bringup --sim --arg role:=robot``: camera,
safety and simulated arm nodes) on the robot host, the inference side (``--arg role:=inference``:
the VLA node with the shipped checkpoint, on the CPU) on the inference host, and a recorder
(``vla_ros.testing.probe_node record``) beside the safety node. Every process uses
``config/fastdds_fleet.xml`` (shared memory within a host, UDP between hosts) and
``ROS_DISCOVERY_SERVER``. The checks below read the recording only, so a test and the bench
judge a run the same way; times are ns of the system clock that all hosts share.
"""

from __future__ import annotations

import bisect
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from vla_ros.bringup import config_dir
from vla_ros.testing import NodeProcess, ros_env, wait_for
from vla_ros.testing.netns import Host, Lan, stop_group
from vla_ros.testing.probe_node import Recording

#: UDP port of the discovery server (the fastdds CLI's default).
SERVER_PORT = 11811

#: The commands docs/fleet.md shows, as this graph runs them ({robot}: the robot host's address;
#: ``vla-ros`` runs as ``python -m vla_ros.cli``, with ``--quiet --duration`` added).
SERVER_COMMAND = ('fastdds', 'discovery', '-i', '0', '-l', '{robot}', '-p', str(SERVER_PORT))
ROBOT_COMMAND = ('vla-ros', 'bringup', '--sim', '--arg', 'role:=robot')
INFERENCE_COMMAND = ('vla-ros', 'bringup', '--arg', 'role:=inference')
#: The environment both hosts set for every process (the profile as its share-folder name).
FLEET_VARIABLES = (('ROS_DISCOVERY_SERVER', f'{{robot}}:{SERVER_PORT}'),
                   ('FASTDDS_DEFAULT_PROFILES_FILE', 'config/fastdds_fleet.xml'))
#: Import torch and load the checkpoint on a busy 2-core machine.
START_TIMEOUT = 120.0
#: Slack for what one host sees a few ms after another (recorder vs safety node receipt).
SLACK_NS = 50_000_000


@dataclass(frozen=True)
class Limits:
    """The safety node timings the checks hold the run to (from config/safety_node.yaml)."""

    action_timeout: float
    camera_timeout: float
    output_period: float

    @classmethod
    def of(cls, safety_yaml: Path | None = None) -> Limits:
        """The values of a safety_node parameter file (default: the shipped one)."""
        p = _safety_params(safety_yaml or config_dir() / 'safety_node.yaml')
        return cls(float(p['action_timeout']), float(p['camera_timeout']),
                   1.0 / float(p['output_rate_hz']))

    @property
    def stop_bound_ns(self) -> int:
        """After the last action arrives, the arm is still by then: action_timeout + 1 period."""
        return int((self.action_timeout + self.output_period) * 1e9)


def _safety_params(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding='utf-8'))['/**/safety_node']['ros__parameters']


def safety_config(path: Path, **overrides: object) -> Path:
    """Write the shipped safety_node parameters with ``overrides`` to ``path``."""
    params = _safety_params(config_dir() / 'safety_node.yaml')
    unknown = set(overrides) - set(params)
    if unknown:
        raise KeyError(f'not safety_node parameters: {sorted(unknown)}')
    params.update(overrides)
    path.write_text(yaml.safe_dump({'/**/safety_node': {'ros__parameters': params}}),
                    encoding='utf-8')
    return path


def fleet_env(domain_id: int, server: str, profile: Path | None = None,
              **extra: str) -> dict[str, str]:
    """Environment of every fleet process: the fleet profile, the discovery server, SUBNET."""
    return ros_env(domain_id, {
        'ROS_AUTOMATIC_DISCOVERY_RANGE': 'SUBNET',
        'FASTDDS_DEFAULT_PROFILES_FILE': str(profile or config_dir() / 'fastdds_fleet.xml'),
        'ROS_DISCOVERY_SERVER': server,
        # The fastdds CLI is a script that runs ``python3``: this interpreter's.
        'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ.get("PATH", "")}',
        **extra,
    })


def vla_ros(host: Host, env: dict[str, str], *args: str, timeout: float = 30.0):  # noqa: ANN201
    """Run one ``vla-ros`` command on ``host`` (CompletedProcess)."""
    return host.run(sys.executable, '-m', 'vla_ros.cli', *args, env=env, timeout=timeout,
                    check=False)


class TwoHostGraph:
    """Robot side + discovery server + recorder on ``robot``, VLA node on ``inference``."""

    def __init__(self, net: Lan, domain_id: int, record: Path, *,
                 safety_yaml: Path | None = None, profile: Path | None = None,
                 robot: str = 'robot', inference: str = 'inference') -> None:
        self.robot, self.inference = net[robot], net[inference]
        self.safety_yaml = safety_yaml
        self.limits = Limits.of(safety_yaml)
        self.server = f'{self.robot.address}:{SERVER_PORT}'
        self.env = fleet_env(domain_id, self.server, profile)
        self.rec = Recording(record)
        self._record = record
        self.procs: list[NodeProcess] = []
        self.discovery: NodeProcess | None = None

    def __enter__(self) -> TwoHostGraph:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start everything; return when the VLA node is active and the safety node publishes."""
        self.discovery = self.robot.spawn(
            *(a.format(robot=self.robot.address) for a in SERVER_COMMAND), env=self.env,
            name='discovery_server')
        assert self.discovery.wait_for_output('Server started', 30), self.discovery.output
        quiet = ('--quiet', '--duration', '900')
        safety = ('--arg', f'safety_config:={self.safety_yaml}') if self.safety_yaml else ()
        self.robot_side = self.robot.node_process(
            'vla_ros.cli', [*ROBOT_COMMAND[1:], *quiet, *safety], env=self.env,
            name='robot_side')
        self.inference_side = self.inference.node_process(
            'vla_ros.cli', [*INFERENCE_COMMAND[1:], *quiet], env=self.env,
            name='inference_side')
        self.recorder = self.robot.node_process(
            'vla_ros.testing.probe_node', ['record', '--out', str(self._record)], env=self.env,
            name='recorder')
        self.procs = [self.recorder, self.robot_side, self.inference_side]
        assert self.inference_side.wait_for_output('vla node active', START_TIMEOUT), \
            self.inference_side.output
        assert wait_for(lambda: self.rec.update().twists, START_TIMEOUT, 0.1), \
            self.robot_side.output

    def close(self) -> None:
        """Stop the nodes (recorder first), then the discovery server."""
        for p in self.procs:
            p.stop(15.0)
        if self.discovery is not None:
            stop_group(self.discovery)

    def pids(self, side: NodeProcess) -> dict[str, int]:
        """Node pids that a bringup runner printed when it started them."""
        assert side.wait_for_output('[bringup] started', 30), side.output
        line = next(x for x in side.output.splitlines() if x.startswith('[bringup] started'))
        return {name: int(pid) for name, pid in re.findall(r'(\w+) \(pid (\d+)\)', line)}

    def wait_moving(self, timeout: float = 30.0) -> bool:
        """Wait until the arm is being moved right now (a moving twist in the last 0.1 s)."""
        return wait_for(lambda: bool(self.rec.update().moving(time.time_ns() - 100_000_000)),
                        timeout, 0.05)

    def moving_after(self, since_ns: int, timeout: float) -> dict | None:
        """The first moving twist stamped after ``since_ns`` (waits up to ``timeout`` s)."""
        found: list[dict] = []

        def look() -> bool:
            found[:] = self.rec.update().moving(since_ns)[:1]
            return bool(found)
        return found[0] if wait_for(look, timeout, 0.1) else None


# ------------------------------------------------------------------------------ the checks
def stale_motion(rec: Recording, limits: Limits, start_ns: int = 0,
                 end_ns: int | None = None) -> list[dict]:
    """Moving twists not justified by a fresh, recent action: must be empty.

    A twist at time t may move the arm only if an action had arrived by then whose camera frame
    is at most camera_timeout old at t (never moves on an action older than its limits), and
    the newest action arrived at most action_timeout + one output period before t (stops that
    long after the actions stop). Actions are those the recorder received by t; under packet
    loss the recorder, a reader of its own, may get an action later than the safety node or
    not at all, so the newest frame stamp and receipt the safety node reports (its status ages)
    count too -- but only when that stamp is one of a camera frame the recorder saw on the
    robot host (frames travel there in shared memory, without loss). Any status from one stop
    bound before the twist to SLACK_NS after it counts: the safety node publishes an action's
    status just after its twist, in the same callback (on a busy machine some ms later), and a
    stale action that arrives next moves the reported frame stamp back.
    """
    actions = sorted(rec.actions, key=lambda a: a['t'])
    receipts = [a['t'] for a in actions]
    stamps = sorted(f['s'] for f in rec.frames)
    statuses = sorted(rec.statuses, key=lambda x: x['s'])
    status_times = [x['s'] for x in statuses]
    bad = []
    for tw in rec.moving(start_ns):
        t = tw['s']
        if end_ns is not None and t > end_ns:
            break
        n = bisect.bisect_right(receipts, t + SLACK_NS)
        newest_stamp = max((a['s'] for a in actions[:n]), default=-1)
        newest_receipt = receipts[n - 1] if n else -1
        lo = bisect.bisect_right(status_times, t - limits.stop_bound_ns)
        hi = bisect.bisect_right(status_times, t + SLACK_NS)
        for held in statuses[lo:hi]:
            if held['camera_age'] < 0 or held['action_age'] < 0:
                continue
            stamp = held['s'] - int(held['camera_age'] * 1e9)
            i = bisect.bisect_left(stamps, stamp - 5_000_000)
            if i < len(stamps) and stamps[i] <= stamp + 5_000_000:  # a real frame's
                newest_stamp = max(newest_stamp, stamp)
                newest_receipt = max(newest_receipt, held['s'] - int(held['action_age'] * 1e9))
        fresh = newest_stamp >= t - limits.camera_timeout * 1e9 - SLACK_NS
        recent = newest_receipt >= t - limits.stop_bound_ns - SLACK_NS
        if not (fresh and recent):
            bad.append(tw)
    return bad


def action_ages(rec: Recording, start_ns: int, end_ns: int) -> list[float]:
    """Age [s] of each action's camera frame when it reached the robot host, in a window."""
    return [(a['t'] - a['s']) * 1e-9 for a in rec.actions if start_ns <= a['t'] <= end_ns]


def frame_to_twist_ms(rec: Recording, start_ns: int = 0,
                      end_ns: int | None = None) -> Iterator[float]:
    """Camera frame -> limited twist [ms] for every action the safety node passed.

    The safety node publishes its status in the callback that publishes the limited twist; the
    first status that reports an action's requested delta, published around the time the
    recorder received the action (policy outputs repeat, so the value alone is ambiguous), dates
    its output if it says ACTIVE.
    """
    statuses = sorted(rec.statuses, key=lambda s: s['s'])
    for a in rec.actions:
        if a['t'] < start_ns or (end_ns is not None and a['t'] > end_ns):
            continue
        for s in statuses:
            if s['s'] < a['t'] - SLACK_NS:
                continue
            if s['s'] > a['t'] + 2 * SLACK_NS:
                break
            if s['req'][:6] == a['d'][:6]:
                if s['state'] == 1:  # ACTIVE: the twist of this action went out
                    yield (s['s'] - a['s']) * 1e-6
                break


# ------------------------------------------------------------------------------ figures
#: Row labels of the figures table, by bench phase.
PHASE_LABELS = {
    'baseline': 'clean link', 'delay_100ms': '100 ms each way', 'delay_200ms': '200 ms each way',
    'loss_10pct': '10 % loss', 'delay_200ms_loss_10pct': '200 ms each way + 10 % loss',
}


def figures_table(result: dict) -> list[str]:
    """The markdown table docs/fleet.md shows for one bench_two_hosts.py result."""
    def ms(x: float | None) -> str:
        return '-' if x is None else f'{x:.0f}'

    def s(x: float | None) -> str:
        return '-' if x is None else f'{x:.2f}'

    rows = ['| phase | actions/s | frame age on arrival p50 [ms] | passed by the limiter '
            '| frame -> twist p50 [ms] | twists moving the arm | moving again after [s] '
            '| load |', '| --- | --- | --- | --- | --- | --- | --- | --- |']
    runs = [('', result['two_hosts'])]
    if 'one_host' in result:
        runs.append(('one host: ', result['one_host']))
    for prefix, run in runs:
        for name, label in PHASE_LABELS.items():
            r = run.get(name)
            if r is None:
                continue
            share = r['moving_twist_share']
            rows.append(
                f'| {prefix}{label} | {r["action_rate_hz"]:.1f} '
                f'| {ms(r["frame_age_on_arrival_ms"]["p50"])} '
                f'| {r["actions_passed"]} of {r["actions_received"]} '
                f'| {ms(r["frame_to_twist_ms"]["p50"])} '
                f'| {"-" if share is None else f"{share:.0%}"} '
                f'| {s(r["moving_again_after_s"])} | {r["load_1min"]:.1f} |')
    down = result['two_hosts'].get('link_down')
    if down is not None:
        rows.append(f'| link down {down["held_s"]:.0f} s | 0 while down | - | - | - '
                    f'| last {s(down["last_motion_after_cut_s"])} s after the cut '
                    f'(bound {s(down["bound_s"])}) | {s(down["moving_again_after_s"])} | |')
    return rows


def round_trip_table(result: dict) -> list[str]:
    """The markdown table of the within-a-host round trips of one result, per profile."""
    trips = result.get('shm_round_trips', {})
    rows = ['| profile | 224x224 observation round trip p50 / p90 [ms] '
            '| 640x480 image round trip p50 / p90 [ms] |', '| --- | --- | --- |']
    for profile, kinds in trips.items():
        cells = [f'{kinds[k]["rtt_p50_ms"]:.1f} / {kinds[k]["rtt_p90_ms"]:.1f}'
                 for k in ('observation', 'image')]
        rows.append(f'| `{profile}` | {cells[0]} | {cells[1]} |')
    return rows
