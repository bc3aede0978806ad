"""Graph test: with config/fastdds_shm.xml, frames between two processes go through shared memory.

Two processes (``vla_ros.testing.pingpong_node`` ping and pong) exchange 224x224 Observations and
640x480 Images, both loaded with the profile through ``FASTDDS_DEFAULT_PROFILES_FILE``. Images are
sent reliable here: the contract's camera QoS is best effort, and over UDP most best-effort
640x480 frames are lost when a frame is larger than the socket receive buffer (Linux default
208 KiB), which would starve the control. While the
frames flow, the test reads ``/proc/<pid>/maps`` of both processes: each must map new Fast DDS
data segments (``/dev/shm/fastdds_<16 hex>``) of the profile's ``segment_size`` (the builtin SHM
transport's segments are 512 KiB), and the frames' own byte pattern, a random marker chosen here,
must be found inside them. The control runs the same exchange with a UDP-only profile: frames
still flow, neither process maps any Fast DDS segment, and no segment in /dev/shm holds the frames.

Leftovers from other tests cannot confuse this: segments are attributed through the maps of the
processes started here, must not have existed before, and must contain this run's marker.

Discovery range: Fast DDS's builtin transports already include SHM, which a profile that sets
``useBuiltinTransports`` false replaces; but with ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``
(what ``ros_env`` sets) rmw_fastrtps appends its own SHM and UDP transports to whatever the profile
says, so a UDP-only control is only meaningful under SUBNET (the ROS default). The SHM proof runs
under both ranges.
"""

from __future__ import annotations

import glob
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vla_ros.testing import NodeProcess, node_processes, ros_env, udp_only_profile, wait_for
from vla_ros.testing.pingpong_node import pattern

pytestmark = [
    pytest.mark.graph,
    pytest.mark.skipif(not os.path.isdir('/dev/shm') or not os.path.isdir('/proc/self'),
                       reason='needs Linux /dev/shm and /proc'),
]

PROFILE = Path(__file__).resolve().parents[1] / 'config' / 'fastdds_shm.xml'
DATA_SEGMENT = re.compile(r'^/dev/shm/fastdds_[0-9a-f]{16}$')
KINDS = ('observation', 'image')


def _profile_segment_size(path: Path) -> int:
    sizes = [int(e.text) for e in ET.parse(path).iter() if e.tag.endswith('segment_size')]
    assert len(sizes) == 1, f'{path} should declare one SHM segment_size, found {sizes}'
    return sizes[0]


def _fastdds_maps(pid: int) -> set[str]:
    """The /dev/shm/fastdds_* files that process ``pid`` has mapped now."""
    with open(f'/proc/{pid}/maps') as f:
        return {line.split()[-1] for line in f if ' /dev/shm/fastdds_' in line}


def _holding(paths: set[str], marker: bytes, timeout: float) -> dict[str, set[str]]:
    """Which of ``paths`` hold frame bytes of each kind, sampled until all kinds are seen.

    Buffers in a segment are reused frame after frame, so one look can miss a kind; frames keep
    flowing while this polls.
    """
    found: dict[str, set[str]] = {kind: set() for kind in KINDS}

    def look() -> bool:
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError:  # a segment of another test, removed meanwhile
                continue
            for kind in KINDS:
                if pattern(kind, marker) * 4 in data:
                    found[kind].add(path)
        return all(found.values())

    wait_for(look, timeout, period=0.1)
    return found


def _exchange(domain_id: int, profile: Path,
              discovery_range: str) -> tuple[bytes, NodeProcess, NodeProcess]:
    """Start pong and ping with ``profile``: ping sends both kinds at 50 Hz until stopped."""
    env = ros_env(domain_id, {'FASTDDS_DEFAULT_PROFILES_FILE': str(profile),
                              'ROS_AUTOMATIC_DISCOVERY_RANGE': discovery_range})
    marker = os.urandom(16)
    qos = ['--image-qos', 'reliable']
    pong = NodeProcess('vla_ros.testing.pingpong_node', ['pong', *qos], env=env, name='pong')
    ping = NodeProcess('vla_ros.testing.pingpong_node',
                       ['ping', *qos, '--count', '0', '--rate', '50', '--log-every', '10',
                        '--marker', marker.hex()],
                       env=env, name='ping')
    return marker, pong, ping


def _wait_flowing(ping: NodeProcess, pong: NodeProcess, echoes: int = 1) -> None:
    for kind in KINDS:
        assert ping.wait_for_output(f'echoes {kind} {echoes}', 20), (
            f'no {kind} echo #{echoes}\nping:\n{ping.output}\npong:\n{pong.output}')


def _echoes(ping: NodeProcess, kind: str) -> int:
    """The highest echo count of ``kind`` that ping has logged (it logs #1, then every 10th)."""
    return max(map(int, re.findall(rf'echoes {kind} (\d+)', ping.output)), default=0)


@pytest.mark.parametrize('discovery_range', ['SUBNET', 'LOCALHOST'])
def test_profile_frames_travel_in_its_shared_memory_segments(
        domain_id: int, discovery_range: str) -> None:
    segment_size = _profile_segment_size(PROFILE)
    before = set(glob.glob('/dev/shm/fastdds_*'))
    marker, pong, ping = _exchange(domain_id, PROFILE, discovery_range)
    with node_processes(ping, pong):
        _wait_flowing(ping, pong)
        maps = {p.name: _fastdds_maps(p.proc.pid) for p in (ping, pong)}
        # Segments of the profile's size, mapped by both processes and new since the test began:
        # each process maps its own segment and, to read what the peer sent, the peer's.
        shared = {s for s in maps['ping'] & maps['pong']
                  if DATA_SEGMENT.match(s) and s not in before
                  and os.path.getsize(s) >= segment_size}
        holding = _holding(shared, marker, timeout=5.0)
        seen = {kind: _echoes(ping, kind) for kind in KINDS}
        # Frames kept flowing after the segments were looked at.
        assert wait_for(lambda: all(_echoes(ping, k) > seen[k] for k in KINDS), 10, 0.05), (
            ping.output)
    assert len(shared) >= 2, f'expected >= 2 new {segment_size}-byte segments, maps: {maps}'
    for kind in KINDS:
        assert holding[kind], f'no profile segment holds the {kind} frames; maps: {maps}'
    assert 'corrupt' not in ping.output
    assert (ping.proc.returncode, pong.proc.returncode) == (0, 0), ping.output + pong.output


def test_udp_only_profile_maps_no_shared_memory(domain_id: int, tmp_path: Path) -> None:
    profile = tmp_path / 'udp_only.xml'
    profile.write_text(udp_only_profile())
    before = set(glob.glob('/dev/shm/fastdds_*'))
    marker, pong, ping = _exchange(domain_id, profile, 'SUBNET')
    with node_processes(ping, pong):
        _wait_flowing(ping, pong, echoes=20)
        maps = {p.name: _fastdds_maps(p.proc.pid) for p in (ping, pong)}
        new = set(glob.glob('/dev/shm/fastdds_*')) - before
        holding = _holding(new, marker, timeout=1.0)
    assert maps == {'ping': set(), 'pong': set()}, f'UDP-only processes map SHM: {maps}'
    assert holding == {'observation': set(), 'image': set()}, holding
    assert (ping.proc.returncode, pong.proc.returncode) == (0, 0), ping.output + pong.output
