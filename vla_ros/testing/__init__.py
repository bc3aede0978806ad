"""Reusable helpers for tests that run real ROS 2 nodes over Fast DDS, in-process and as processes.

Graph tests isolate themselves with their own ``ROS_DOMAIN_ID`` and keep discovery on localhost;
nodes run as separate processes started with ``python -m <module>`` so a crash or a stall in one
cannot hide inside the test process. Nothing here is a mock: these are real rclpy nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vla_ros.cli import die_with_parent

#: DDS domains handed out to tests (Fast DDS ports for ids 0..101 stay below 32768).
TEST_DOMAINS = range(1, 102)
_LOCK_DIR = Path(os.environ.get('VLA_ROS_DOMAIN_LOCKS', '/tmp/vla_ros_domain_locks'))


@contextlib.contextmanager
def reserved_domain() -> Iterator[int]:
    """Hold a DDS domain id no other process on this machine holds (a flock per id).

    Concurrent test sessions (two checkouts, CI beside a developer) would otherwise cross-talk
    on a shared domain; the lock is released when the block ends or the process dies.
    """
    _LOCK_DIR.mkdir(parents=True, exist_ok=True)
    start = os.getpid() % len(TEST_DOMAINS)
    for i in range(len(TEST_DOMAINS)):
        domain = TEST_DOMAINS[(start + i) % len(TEST_DOMAINS)]
        fd = os.open(_LOCK_DIR / f'{domain}.lock', os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        state = state_dir(domain)  # nodes' persisted state (the safety latch) starts empty
        shutil.rmtree(state, ignore_errors=True)
        try:
            yield domain
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    raise RuntimeError(f'all DDS test domains {TEST_DOMAINS} are in use')


def state_dir(domain_id: int) -> Path:
    """The ``XDG_STATE_HOME`` of node processes on test domain ``domain_id`` (see ``ros_env``)."""
    return _LOCK_DIR.parent / 'vla_ros_state' / str(domain_id)


def udp_only_profile(socket_buffer_bytes: int | None = None) -> str:
    """A Fast DDS profile with UDPv4 as the only transport (the control for shared memory)."""
    buffers = '' if socket_buffer_bytes is None else (
        f'\n        <sendBufferSize>{socket_buffer_bytes}</sendBufferSize>'
        f'\n        <receiveBufferSize>{socket_buffer_bytes}</receiveBufferSize>')
    return f"""<?xml version="1.0" encoding="UTF-8" ?>
<dds xmlns="http://www.eprosima.com">
  <profiles>
    <transport_descriptors>
      <transport_descriptor>
        <transport_id>udp_only</transport_id>
        <type>UDPv4</type>{buffers}
      </transport_descriptor>
    </transport_descriptors>
    <participant profile_name="udp_only_participant" is_default_profile="true">
      <rtps>
        <userTransports><transport_id>udp_only</transport_id></userTransports>
        <useBuiltinTransports>false</useBuiltinTransports>
      </rtps>
    </participant>
  </profiles>
</dds>
"""


def ros_env(domain_id: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a node process: this interpreter's env plus an isolated DDS domain."""
    env = dict(os.environ)
    env.update({
        'ROS_DOMAIN_ID': str(domain_id),
        'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
        'RMW_IMPLEMENTATION': 'rmw_fastrtps_cpp',
        'PYTHONUNBUFFERED': '1',
        # Persisted node state (the safety node's e-stop latch) per test domain, emptied when
        # the domain is reserved: never the user's own state folder, never another test's.
        'XDG_STATE_HOME': str(state_dir(domain_id)),
    })
    if extra:
        env.update(extra)
    return env


def wait_for(predicate: Callable[[], bool], timeout: float, period: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


def spin_until(executor: object, predicate: Callable[[], bool], timeout: float) -> bool:
    """Spin ``executor`` (an rclpy executor) until ``predicate`` holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=0.02)  # type: ignore[attr-defined]
    return bool(predicate())


class NodeProcess:
    """A node started as its own process, output kept for asserts.

    ``python -m module args`` by default; ``executable`` starts that program instead (e.g. an
    installed ``lib/vla_ros/<node>``), with ``args`` after it.
    """

    def __init__(self, module: str, args: Sequence[str] = (), *, env: dict[str, str],
                 name: str | None = None, cwd: str | Path | None = None,
                 executable: str | Path | None = None) -> None:
        self.name = name or module.rsplit('.', 1)[-1]
        self._lines: list[str] = []
        self._lock = threading.Lock()
        command = [str(executable)] if executable else [sys.executable, '-m', module]
        self.proc = subprocess.Popen(
            [*command, *args], env=env, cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # a node never outlives the test or bench that started it
            preexec_fn=die_with_parent if sys.platform == 'linux' else None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line.rstrip('\n'))

    @property
    def output(self) -> str:
        """Everything the process printed so far."""
        with self._lock:
            return '\n'.join(self._lines)

    def wait_for_output(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` appears in the process output."""
        return wait_for(lambda: text in self.output, timeout, period=0.05)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process (SIGKILL by default: an abrupt crash)."""
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop gracefully (SIGINT), then escalate; return the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(timeout=1.0)
        return self.proc.returncode


@contextlib.contextmanager
def node_processes(*procs: NodeProcess) -> Iterator[tuple[NodeProcess, ...]]:
    """Stop all processes on exit, whatever happened in the block."""
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


@contextlib.contextmanager
def rclpy_context(domain_id: int) -> Iterator[object]:
    """An rclpy context on ``domain_id``, initialised and shut down around the block."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=domain_id)
    try:
        yield context
    finally:
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=context)
