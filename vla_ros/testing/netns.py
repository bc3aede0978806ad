"""Hosts on a switched network made of Linux namespaces, with link faults, for fleet tests.

``Lan`` builds, as root, one network namespace per host and one for a switch: each host has an
``eth0`` (10.42.0.N/24) whose veth peer is a port of a kernel bridge in the switch namespace.
A host is more than a network namespace: an anchor process holds its own mount namespace with
a private ``/dev/shm`` and its own ``/etc/machine-id``, so Fast DDS sees distinct machines (it
derives the host part of its GUIDs from the machine id and uses shared memory only between
participants of one host) and shared memory cannot cross hosts. Every process of a host is
started through ``nsenter`` into both namespaces (:meth:`Host.enter`).

Faults: :meth:`Host.link_down` / :meth:`Host.link_up` (``ip link set eth0 down|up``) and
:meth:`Lan.impair` (delay and loss on every port of the switch). Impairment uses the kernel's
``tc netem`` where the kernel has it; where it does not, the ports leave the bridge and a
userspace hub (``python -m vla_ros.testing.netns hub``, in the switch namespace) forwards each
Ethernet frame to the other ports after the delay, dropping each with the loss probability, as
netem does per packet. :attr:`Lan.impairment` says which one ran.

Everything is removed when the ``with`` block ends, also after a failure: processes left in
the namespaces are killed, then the namespaces are deleted (which deletes their interfaces).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from vla_ros.testing import NodeProcess

SUBNET = '10.42.0'
HOST_IFACE = 'eth0'
BRIDGE = 'br0'
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17


def _ip(*args: str, netns: str | None = None, check: bool = True
        ) -> subprocess.CompletedProcess:
    cmd = ['ip', *(('-n', netns) if netns else ()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and done.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed: {done.stderr.strip()}')
    return done


def netns_available() -> str:
    """Why namespaced hosts cannot be made here ('' when they can: root, ip, nsenter)."""
    if os.geteuid() != 0:
        return 'needs root (ip netns)'
    for tool in ('ip', 'nsenter', 'unshare', 'tc'):
        if subprocess.run(['sh', '-c', f'command -v {tool}'], capture_output=True).returncode:
            return f'needs the {tool} command'
    return ''


class Host:
    """One machine of the LAN: a network namespace plus a mount namespace of its own."""

    def __init__(self, name: str, netns: str, address: str, port: str) -> None:
        self.name = name
        self.netns = netns
        self.address = address
        self.port = port  # its switch port, in the switch namespace
        self.anchor: subprocess.Popen | None = None

    @property
    def shm(self) -> Path:
        """This host's ``/dev/shm``, seen from outside (through the anchor's root)."""
        assert self.anchor is not None
        return Path(f'/proc/{self.anchor.pid}/root/dev/shm')

    def enter(self) -> list[str]:
        """The command prefix that runs a program on this host."""
        assert self.anchor is not None
        # Entering a mount namespace resets the working directory: keep the caller's.
        return ['nsenter', f'--net=/run/netns/{self.netns}',
                f'--mount=/proc/{self.anchor.pid}/ns/mnt', f'--wd={os.getcwd()}', '--']

    def node_process(self, module: str, args: Sequence[str] = (), *, env: dict[str, str],
                     name: str | None = None) -> NodeProcess:
        """Start ``python -m module args`` on this host (see ``vla_ros.testing.NodeProcess``)."""
        prefix = self.enter()
        return NodeProcess(module, [*prefix[1:], sys.executable, '-m', module, *args], env=env,
                           name=name or f'{self.name}:{module.rsplit(".", 1)[-1]}',
                           executable=prefix[0])

    def spawn(self, *cmd: str, env: dict[str, str], name: str) -> NodeProcess:
        """Start any program on this host, output kept; stop it with :func:`stop_group`."""
        prefix = self.enter()
        return NodeProcess(name, [*prefix[1:], *cmd], env=env, name=name, executable=prefix[0])

    def run(self, *cmd: str, timeout: float = 30.0, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` on this host and wait for it."""
        done = subprocess.run([*self.enter(), *cmd], capture_output=True, text=True,
                              timeout=timeout, check=False, env=env)
        if check and done.returncode:
            raise RuntimeError(f'{self.name}: {" ".join(cmd)} failed ({done.returncode}): '
                               f'{done.stdout}{done.stderr}')
        return done

    def link_down(self) -> None:
        """Take this host's network link down (``ip link set eth0 down``)."""
        _ip('link', 'set', HOST_IFACE, 'down', netns=self.netns)

    def link_up(self) -> None:
        """Bring the link back (address and routes restored)."""
        _ip('link', 'set', HOST_IFACE, 'up', netns=self.netns)
        _ip('route', 'replace', '224.0.0.0/4', 'dev', HOST_IFACE, netns=self.netns)

    def counters(self) -> dict[str, int]:
        """Bytes and packets through ``eth0`` so far (rx_bytes, tx_bytes, ...)."""
        base = f'/sys/class/net/{HOST_IFACE}/statistics'
        out = self.run('sh', '-c', f'cd {base} && grep . rx_bytes tx_bytes rx_packets '
                       f'tx_packets').stdout
        return {k: int(v) for k, v in (line.split(':') for line in out.split())}


def _delete(netns: str) -> None:
    """Kill the processes left in ``netns`` (started by the test that made it), delete it."""
    for pid in _ip('netns', 'pids', netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip('netns', 'del', netns, check=False)


def remove_stale() -> None:
    """Delete the namespaces of test processes that died without cleaning up (SIGKILL)."""
    for line in _ip('netns', 'list', check=False).stdout.splitlines():
        match = re.match(r'(vla(\d+)-\S+)', line)
        if match is None:
            continue
        try:
            os.kill(int(match.group(2)), 0)
        except ProcessLookupError:
            _delete(match.group(1))
        except PermissionError:  # alive, someone else's
            continue


def stop_group(proc: NodeProcess, timeout: float = 5.0) -> None:
    """SIGINT the process group of ``proc`` (a shell script and its children), then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.proc.pid, sig)
        try:
            proc.proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.stop()


class Lan:
    """Hosts joined by one switch; a context manager that tears everything down on exit."""

    def __init__(self, names: Sequence[str]) -> None:
        why = netns_available()
        if why:
            raise RuntimeError(f'cannot build namespaced hosts: {why}')
        tag = f'vla{os.getpid()}'
        self.switch = f'{tag}-switch'
        self.hosts = {name: Host(name, f'{tag}-{name}', f'{SUBNET}.{i + 1}', f'p{i}')
                      for i, name in enumerate(names)}
        self.impairment = ''
        self._hub: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix='vla_lan_')

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- set-up and tear-down ----------------------------------------------------------------
    def __enter__(self) -> Lan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        remove_stale()
        _ip('netns', 'add', self.switch)
        _ip('link', 'add', BRIDGE, 'type', 'bridge', netns=self.switch)
        _ip('link', 'set', BRIDGE, 'up', netns=self.switch)
        for host in self.hosts.values():
            _ip('netns', 'add', host.netns)
            _ip('link', 'set', 'lo', 'up', netns=host.netns)
            _ip('link', 'add', host.port, 'netns', self.switch, 'type', 'veth',
                'peer', 'name', HOST_IFACE, 'netns', host.netns)
            _ip('link', 'set', host.port, 'master', BRIDGE, 'up', netns=self.switch)
            _ip('addr', 'add', f'{host.address}/24', 'dev', HOST_IFACE, netns=host.netns)
            host.link_up()
            host.anchor = self._anchor(host)

    def _anchor(self, host: Host) -> subprocess.Popen:
        """Start the process that holds ``host``'s mount namespace (private /dev/shm, id)."""
        machine_id = Path(self._tmp.name) / f'{host.name}.machine-id'
        machine_id.write_text(os.urandom(16).hex() + '\n')
        script = ('mount -t tmpfs -o size=1g,mode=1777 tmpfs /dev/shm && '
                  f'mount --bind {machine_id} /etc/machine-id && echo ready && '
                  'exec sleep infinity')
        proc = subprocess.Popen(
            ['ip', 'netns', 'exec', host.netns, 'unshare', '--mount', '--propagation',
             'private', 'sh', '-c', script],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        line = proc.stdout.readline()
        if line.strip() != 'ready':
            proc.kill()
            raise RuntimeError(f'host {host.name}: mount namespace not made: {line}'
                               f'{proc.stdout.read()}')
        return proc

    def close(self) -> None:
        """Kill what still runs in the namespaces, then delete them."""
        self._stop_hub()
        for host in self.hosts.values():
            if host.anchor is not None and host.anchor.poll() is None:
                host.anchor.kill()
                host.anchor.wait()
        for netns in [h.netns for h in self.hosts.values()] + [self.switch]:
            _delete(netns)
        self._tmp.cleanup()

    # -- impairment --------------------------------------------------------------------------
    def impair(self, delay: float = 0.0, loss: float = 0.0) -> str:
        """Delay every frame by ``delay`` s and drop it with probability ``loss``.

        Applied on every switch port, so each direction of every path has them once; returns
        the mechanism used (``netem`` or ``userspace hub``).
        """
        self.clear()
        if _netem_ok(self.switch, self._ports()[0]):
            for port in self._ports():
                _ip_tc(self.switch, 'qdisc', 'add', 'dev', port, 'root', 'netem',
                       'delay', f'{delay * 1000:.0f}ms', 'loss', f'{loss * 100:g}%')
            self.impairment = 'netem'
        else:
            # The hub copies frames as they are; with transmit checksum offload (the veth
            # default) the hosts' kernels leave UDP checksums to the "hardware", and the copy
            # would arrive with a bad one. Full checksums in software instead.
            for host in self.hosts.values():
                subprocess.run(['ip', 'netns', 'exec', host.netns, sys.executable, '-m',
                                'vla_ros.testing.netns', 'tx-checksum-off', HOST_IFACE],
                               check=True, capture_output=True)
            for port in self._ports():
                _ip('link', 'set', port, 'nomaster', netns=self.switch)
            self._hub = subprocess.Popen(
                ['ip', 'netns', 'exec', self.switch, sys.executable, '-m',
                 'vla_ros.testing.netns', 'hub', '--delay', str(delay), '--loss', str(loss),
                 *self._ports()],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
            line = self._hub.stdout.readline()
            if not line.startswith('hub ready'):
                raise RuntimeError(f'hub did not start: {line}{self._hub.stdout.read()}')
            self.impairment = 'userspace hub'
        return self.impairment

    def clear(self) -> None:
        """Remove any impairment: the kernel bridge forwards again."""
        if self.impairment == 'netem':
            for port in self._ports():
                _ip_tc(self.switch, 'qdisc', 'del', 'dev', port, 'root', check=False)
        elif self.impairment:
            self._stop_hub()
            for port in self._ports():
                _ip('link', 'set', port, 'master', BRIDGE, netns=self.switch)
        self.impairment = ''

    def _stop_hub(self) -> None:
        if self._hub is not None and self._hub.poll() is None:
            self._hub.send_signal(signal.SIGINT)
            try:
                self._hub.wait(5)
            except subprocess.TimeoutExpired:
                self._hub.kill()
                self._hub.wait()
        self._hub = None

    def _ports(self) -> list[str]:
        return [h.port for h in self.hosts.values()]


def _ip_tc(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ['ip', 'netns', 'exec', netns, 'tc', *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and done.returncode:
        raise RuntimeError(f'{" ".join(cmd)} failed: {done.stderr.strip()}')
    return done


def _netem_ok(netns: str, port: str) -> bool:
    """Whether this kernel has the netem qdisc (tried on ``port``, removed again)."""
    if _ip_tc(netns, 'qdisc', 'add', 'dev', port, 'root', 'netem', 'delay', '0ms',
              check=False).returncode:
        return False
    _ip_tc(netns, 'qdisc', 'del', 'dev', port, 'root', check=False)
    return True


def netem_supported() -> bool:
    """Whether the running kernel has ``tc netem`` (tried on a scratch interface)."""
    name = f'vla{os.getpid()}-probe'
    _ip('netns', 'add', name)
    try:
        _ip('link', 'add', 'probe0', 'type', 'veth', 'peer', 'name', 'probe1', netns=name)
        return _netem_ok(name, 'probe0')
    finally:
        _ip('netns', 'del', name, check=False)


# ------------------------------------------------------------------------------ userspace hub
def hub(ports: Sequence[str], delay: float, loss: float, seed: int | None = None) -> None:
    """Forward Ethernet frames between ``ports`` like a hub, with delay and loss.

    Each frame goes to every other port ``delay`` s after it arrived, unless it is lost (with
    probability ``loss``, drawn per frame and port); runs until SIGINT/SIGTERM.
    """
    rng = random.Random(seed)
    socks = {}
    for port in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((port, ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setblocking(False)
        socks[s.fileno()] = (port, s)
        _ip('link', 'set', port, 'up')
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    counts = {'received': 0, 'dropped': 0, 'sent': 0, 'send_failed': 0}
    print(f'hub ready: {",".join(ports)} delay {delay} s loss {loss}', flush=True)
    while not stop:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                out.send(frame)
                counts['sent'] += 1
            except OSError:  # a port that is down drops the frame
                counts['send_failed'] += 1
        timeout = max(0.0, queue[0][0] - now) if queue else 0.1
        try:
            ready, _, _ = select.select(list(socks), [], [], timeout)
        except InterruptedError:
            continue
        for fd in ready:
            port, sock = socks[fd]
            while True:
                try:
                    frame, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if addr[2] == PACKET_OUTGOING:  # our own sends, looped back to us
                    continue
                counts['received'] += 1
                due = time.monotonic() + delay
                for other_port, other in socks.values():
                    if other_port == port:
                        continue
                    if rng.random() < loss:
                        counts['dropped'] += 1
                        continue
                    seq += 1
                    heapq.heappush(queue, (due, seq, other, frame))
    print('hub stopped: ' + ' '.join(f'{k} {v}' for k, v in counts.items()), flush=True)


def tx_checksum_off(iface: str) -> None:
    """Turn transmit checksum offload off on ``iface`` (``ethtool -K iface tx off``)."""
    cmd = struct.pack('II', ETHTOOL_STXCSUM, 0)
    buf = ctypes.create_string_buffer(cmd, len(cmd))
    ifreq = struct.pack('16sP', iface.encode(), ctypes.addressof(buf))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vla_ros.testing.netns hub --delay S --loss P PORT...`` (in the switch ns)."""
    parser = argparse.ArgumentParser(prog='python -m vla_ros.testing.netns')
    sub = parser.add_subparsers(dest='command', required=True)
    h = sub.add_parser('hub', help='forward frames between ports with delay and loss')
    h.add_argument('ports', nargs='+')
    h.add_argument('--delay', type=float, default=0.0, help='seconds added to every frame')
    h.add_argument('--loss', type=float, default=0.0, help='probability a frame is dropped')
    h.add_argument('--seed', type=int, default=None)
    t = sub.add_parser('tx-checksum-off', help='turn transmit checksum offload off')
    t.add_argument('iface')
    opts = parser.parse_args(argv)
    if opts.command == 'hub':
        hub(opts.ports, opts.delay, opts.loss, opts.seed)
    else:
        tx_checksum_off(opts.iface)
    return 0


if __name__ == '__main__':
    sys.exit(main())
