"""VLA node: ``Observation`` -> OpenVLA -> ``VlaAction`` for one arm or many, off the executor.

A lifecycle node (it holds a GPU): the model is loaded in ``on_configure`` (a failure leaves the
node alive and unconfigured, the reason in ``/diagnostics``, nothing published), inference runs
in ``on_activate`` .. ``on_deactivate``, memory is freed in ``on_cleanup``. With ``autostart``
(default) it configures and activates itself, so plain ``ros2 run`` and the runner need no
lifecycle manager.

One node serves every arm of its ``arms`` parameter (empty: one arm, the node's own
``observation`` and ``action``; else ``<arm>/observation`` and ``<arm>/action`` per arm). Each
arm's observation callback only writes that arm's size-1 drop-oldest buffer. One worker thread,
whenever it is free, takes the newest observation of every arm that has a fresh one (older than
``max_observation_age``: skipped), runs them as one ``predict_batch`` and publishes each arm's
``VlaAction`` on that arm's topic, its header copied from that arm's observation. It never waits
for an arm whose frames stop, and one arm's bad input (a malformed image, an unusable
instruction) costs only that arm its action: its safety node's watchdog then stops it. The
action publishers are reliable, depth 1, liveliness AUTOMATIC (one writer per arm, so each
safety node sees a dead process). ``diagnostics``: the policy's status and one per arm (rates,
latency, dropped, stale, rejected).
"""

from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn

from vla_ros.core.buffer import LatestBuffer
from vla_ros.core.errors import ConfigError, VlaRosError
from vla_ros.core.image import decode_image
from vla_ros.msg import Observation, VlaAction
from vla_ros.nodes import qos
from vla_ros.nodes.params import Param, declare
from vla_ros.nodes.runtime import run_node

PARAMS = (
    Param('model_path', '', 'OpenVLA checkpoint directory; empty = the shipped checkpoint '
          'trained on the simulated arm (checkpoints/sim_tabletop).', read_only=True),
    Param('unnorm_key', '', 'Dataset statistics used to un-normalize actions.', read_only=True),
    Param('device', 'auto', 'auto | cpu | cuda | cuda:N.', read_only=True),
    Param('dtype', 'auto', 'auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float16 | float32.',
          read_only=True),
    Param('quantization', 'none', 'none (bf16 on a GPU) | int4 (the Llama in 4 bits: about '
          '6 GB for openvla-7b, faster on a GPU).', read_only=True),
    Param('lora_path', '', 'Optional peft LoRA adapter directory (merged into the weights on '
          'load).', read_only=True),
    Param('constrain_actions', True, 'Restrict decoding to the 256 action tokens.',
          read_only=True),
    Param('max_observation_age', 1.0, 'Observations older than this are skipped [s].', 0.01,
          30.0),
    Param('autostart', True, 'Configure and activate on start-up.', read_only=True),
    Param('cpu_threads', 1, 'Torch CPU threads (0 = torch default); the rest of the cores stay '
          'free for the safety path.', 0, 256, read_only=True),
    Param('nice', 5, 'Scheduling niceness added to this process, so the safety node preempts '
          'inference on a busy CPU.', 0, 19, read_only=True),
    Param('frame_id', 'panda_link0', 'Frame the action deltas are expressed in (the robot base '
          'frame of the checkpoint); the safety node refuses actions in any other frame.',
          read_only=True),
    Param('arms', '', 'Namespaces of the arms served in one batch, comma-separated, relative '
          'to this node\'s namespace or absolute (/arm1/vla,/arm2/vla): arm a reads '
          'a/observation and publishes a/action. Empty = one arm on this node\'s own '
          'observation and action.', read_only=True),
)

#: Samples kept per arm for the median latencies of the diagnostics.
_WINDOW = 50


@dataclass
class _Arm:
    """One served arm: its observation buffer, action publisher, episode and counters."""

    name: str  # the resolved namespace of its topics, e.g. /arm1/vla
    publisher: Any
    logger: Any
    buffer: LatestBuffer[Observation] = field(default_factory=LatestBuffer)
    episode_id: int | None = None
    received: int = 0
    published: int = 0
    stale: int = 0
    rejected: int = 0
    last_error: str = ''
    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=_WINDOW))
    inference_ms: collections.deque = field(default_factory=lambda: collections.deque(
        maxlen=_WINDOW))
    reported: tuple[float, int, int] = (0.0, 0, 0)  # (time, received, published) last report


class VlaNode(LifecycleNode):
    """Runs the policy on the freshest observation of every arm and publishes their actions."""

    def __init__(self, **node_kwargs: Any) -> None:
        super().__init__('vla_node', **node_kwargs)
        self.p = declare(self, PARAMS)
        if self.p['nice']:
            os.nice(int(self.p['nice']))
        self.policy = None
        self.load_error = ''
        self._active = threading.Event()
        self._stopping = threading.Event()
        self._fresh = threading.Event()
        self._worker: threading.Thread | None = None
        self._stats = threading.Lock()  # the worker's figures, read by the diagnostics timer
        self._batch_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._batch_sizes: collections.deque[int] = collections.deque(maxlen=_WINDOW)
        self.batches = 0
        self._diag_pub = self.create_publisher(DiagnosticArray, 'diagnostics', 10)
        self.arms: list[_Arm] = []
        try:
            from vla_ros.bringup import parse_namespaces
            namespaces = parse_namespaces(str(self.p['arms']), 'arms',
                                          self.get_namespace()) or ('',)
        except ConfigError as exc:
            self.load_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'serving no arm: {self.load_error}')
            namespaces = ()
        for ns in namespaces:
            self._add_arm(ns)
        self.create_timer(1.0, self._publish_diagnostics)

    def _add_arm(self, namespace: str) -> None:
        def topic(name: str) -> str:
            return f'{namespace}/{name}' if namespace else name

        publisher = self.create_publisher(VlaAction, topic('action'), qos.ACTION)
        name = publisher.topic_name.rsplit('/', 1)[0] or '/'
        arm = _Arm(name=name, publisher=publisher,
                   logger=self.get_logger().get_child(name.strip('/').replace('/', '.')))
        self.create_subscription(Observation, topic('observation'),
                                 lambda msg, arm=arm: self._on_observation(arm, msg), qos.LATEST)
        self.arms.append(arm)

    def _on_observation(self, arm: _Arm, msg: Observation) -> None:
        arm.received += 1
        arm.buffer.put(msg)
        self._fresh.set()

    # -- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Load the checkpoint; on failure stay unconfigured and say why in diagnostics."""
        if not self.arms:
            self._publish_diagnostics()
            return TransitionCallbackReturn.FAILURE
        start = time.perf_counter()
        try:
            self.policy = self._load_policy()
            loaded = time.perf_counter()
            # Warm up here, not on the first real frames: compilation (or, on a restart, the
            # compile cache) and graph capture happen now, for every batch size that can occur.
            n = len(self.arms)
            self.policy.warmup(batch_sizes=tuple(range(1, n + 1)))
            self.policy.predict_batch([np.zeros((224, 224, 3), np.uint8)] * n, ['warm up'] * n)
        except (VlaRosError, OSError, RuntimeError, ImportError, ValueError) as exc:
            self.policy = None
            self.load_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'model load failed, publishing nothing: {self.load_error}')
            self._publish_diagnostics()
            return TransitionCallbackReturn.FAILURE
        self.load_error = ''
        self.policy.reset()
        now = time.perf_counter()
        self.get_logger().info(
            f'policy ready in {now - start:.1f} s (load {loaded - start:.1f} s, warm-up '
            f'{now - loaded:.1f} s) on {self.policy.device}, serving '
            f'{", ".join(arm.name for arm in self.arms)}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Start the inference worker."""
        for arm in self.arms:
            arm.buffer.clear()
        self._stopping.clear()
        self._active.set()
        self._worker = threading.Thread(target=self._run, name='vla_inference', daemon=True)
        self._worker.start()
        self.get_logger().info('vla node active')
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        """Stop the inference worker (a running inference finishes, its output is dropped)."""
        self._stop_worker()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        """Free the model (and GPU memory)."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        """Stop and free everything."""
        self._stop_worker()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    # -- model -----------------------------------------------------------------------------
    def _load_policy(self):  # noqa: ANN202 - torch types stay lazy
        from vla_ros.policy.policy import OpenVLAPolicy

        path = str(self.p['model_path'])
        unnorm_key = str(self.p['unnorm_key']) or None
        if not path:
            from vla_ros.bringup import default_checkpoint
            path = str(default_checkpoint())
            self.get_logger().info(f'no model_path: using the shipped checkpoint {path}')
        import torch
        if self.p['cpu_threads']:
            torch.set_num_threads(int(self.p['cpu_threads']))
        device = str(self.p['device'])
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        dtype = None if self.p['dtype'] == 'auto' else str(self.p['dtype'])
        quant = None if self.p['quantization'] == 'none' else str(self.p['quantization'])
        return OpenVLAPolicy.from_pretrained(
            path, unnorm_key=unnorm_key, device=device, dtype=dtype,
            constrain_actions=bool(self.p['constrain_actions']),
            lora_path=str(self.p['lora_path']) or None, quantization=quant,
            progress=lambda line: self.get_logger().info(line))

    def _release(self) -> None:
        self.policy = None
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # -- inference worker ------------------------------------------------------------------
    def _stop_worker(self) -> None:
        self._stopping.set()
        self._active.clear()
        self._fresh.set()  # wake the worker
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None

    def _run(self) -> None:
        while self._active.is_set() and rclpy.ok(context=self.context):
            try:
                self.serve_once(timeout=0.1)
            except Exception as exc:  # noqa: BLE001 - inference must never kill the node
                self.get_logger().error(f'inference failed, no action published: {exc}\n'
                                        f'{traceback.format_exc(limit=3)}',
                                        throttle_duration_sec=2.0)

    def serve_once(self, timeout: float = 0.0) -> int:
        """Serve one batch: every arm's fresh observation, one ``predict_batch``, its actions.

        Waits up to ``timeout`` s for a first observation when none is pending, never for a
        particular arm. Returns the number of actions published. The worker calls this in a
        loop; the policy must be loaded (``on_configure``).
        """
        if timeout > 0:
            self._fresh.wait(timeout)
        self._fresh.clear()
        batch = [(arm, obs) for arm in self.arms if (obs := arm.buffer.take()) is not None]
        samples = [(arm, obs, image) for arm, obs in batch
                   if (image := self._accept(arm, obs)) is not None]
        if not samples:
            return 0
        start = time.perf_counter()
        outputs = self.policy.predict_batch([image for _, _, image in samples],
                                            [obs.instruction for _, obs, _ in samples])
        with self._stats:
            self._batch_ms.append((time.perf_counter() - start) * 1e3)
            self._batch_sizes.append(len(samples))
            self.batches += 1
        if self._stopping.is_set():
            return 0
        published = 0
        for (arm, obs, _), out in zip(samples, outputs, strict=True):
            if isinstance(out, Exception):
                self._reject(arm, f'{type(out).__name__}: {out}')
                continue
            self._publish(arm, obs, out)
            published += 1
        return published

    def _accept(self, arm: _Arm, obs: Observation) -> np.ndarray | None:
        """The observation's image, or None (logged, counted) when it is too old or malformed."""
        age = (self.get_clock().now() - rclpy.time.Time.from_msg(obs.header.stamp)).nanoseconds
        if obs.header.stamp.sec and age * 1e-9 > float(self.p['max_observation_age']):
            arm.stale += 1
            arm.logger.warning(f'skipping an observation {age * 1e-9:.2f} s old',
                               throttle_duration_sec=2.0)
            return None
        if obs.episode_id != arm.episode_id:
            arm.episode_id = obs.episode_id
            # OpenVLA is memoryless, so a reset for one arm changes nothing for the others.
            self.policy.reset()
        try:
            return decode_image(obs.image.data, obs.image.height, obs.image.width,
                                obs.image.encoding, obs.image.step)
        except VlaRosError as exc:
            self._reject(arm, f'{type(exc).__name__}: {exc}')
            return None

    def _reject(self, arm: _Arm, reason: str) -> None:
        arm.rejected += 1
        arm.last_error = reason[:300]
        arm.logger.error(f'no action for this observation: {arm.last_error}',
                         throttle_duration_sec=2.0)

    def _publish(self, arm: _Arm, obs: Observation, out: Any) -> None:
        msg = VlaAction()
        msg.header = obs.header
        msg.header.frame_id = str(self.p['frame_id'])  # the delta's frame, not the camera's
        msg.episode_id = obs.episode_id
        msg.delta = np.asarray(out.action, dtype=np.float64)
        msg.normalized = np.asarray(out.normalized, dtype=np.float64)
        msg.token_ids = np.asarray(out.token_ids, dtype=np.int32)
        msg.token_probs = np.asarray(out.token_probs, dtype=np.float32)
        msg.token_margins = np.asarray(out.token_margins, dtype=np.float32)
        msg.inference_ms = float(out.timings['total'])
        msg.instruction = obs.instruction
        arm.publisher.publish(msg)
        age = self.get_clock().now() - rclpy.time.Time.from_msg(obs.header.stamp)
        with self._stats:
            arm.published += 1
            arm.inference_ms.append(msg.inference_ms)
            if obs.header.stamp.sec:
                arm.latency_ms.append(age.nanoseconds * 1e-6)

    # -- diagnostics -----------------------------------------------------------------------
    @property
    def actions_published(self) -> int:
        """Actions published so far, all arms together."""
        return sum(arm.published for arm in self.arms)

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: policy',
                                  hardware_id=str(self.p['model_path']) or 'sim_tabletop')
        if self.load_error:
            status.level, status.message = DiagnosticStatus.ERROR, self.load_error[:500]
        elif self.policy is None:
            status.level, status.message = DiagnosticStatus.WARN, 'model not loaded'
        else:
            status.level = DiagnosticStatus.OK
            status.message = 'running' if self._active.is_set() else 'loaded, inactive'
        with self._stats:
            self._publish_diagnostics_locked(status)

    def _publish_diagnostics_locked(self, status: DiagnosticStatus) -> None:
        inference = [ms for arm in self.arms for ms in arm.inference_ms]
        status.values = [
            KeyValue(key='actions_published', value=str(self.actions_published)),
            KeyValue(key='median_inference_ms', value=_median(inference)),
            KeyValue(key='dropped_observations',
                     value=str(sum(arm.buffer.dropped for arm in self.arms))),
            KeyValue(key='arms', value=str(len(self.arms))),
            KeyValue(key='batches', value=str(self.batches)),
            KeyValue(key='median_batch_ms', value=_median(self._batch_ms)),
            KeyValue(key='mean_batch_size', value=f'{np.mean(self._batch_sizes):.2f}'
                     if self._batch_sizes else 'nan')]
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [status] + [self._arm_status(arm, status) for arm in self.arms]
        self._diag_pub.publish(array)

    def _arm_status(self, arm: _Arm, policy: DiagnosticStatus) -> DiagnosticStatus:
        now = time.monotonic()
        then, received, published = arm.reported
        arm.reported = (now, arm.received, arm.published)
        dt = now - then if then else 0.0
        obs_hz = (arm.received - received) / dt if dt > 0 else 0.0
        action_hz = (arm.published - published) / dt if dt > 0 else 0.0
        status = DiagnosticStatus(name=f'{self.get_fully_qualified_name()}: arm {arm.name}',
                                  hardware_id=arm.name)
        if policy.level != DiagnosticStatus.OK or not self._active.is_set():
            status.level, status.message = policy.level, f'policy {policy.message}'
        elif arm.received == received:
            status.level, status.message = DiagnosticStatus.WARN, 'no observations'
        elif arm.published == published:
            status.level = DiagnosticStatus.WARN
            status.message = f'no actions: {arm.last_error or "observations too old"}'
        else:
            status.level, status.message = DiagnosticStatus.OK, 'serving'
        status.values = [
            KeyValue(key='observation_rate_hz', value=f'{obs_hz:.2f}'),
            KeyValue(key='action_rate_hz', value=f'{action_hz:.2f}'),
            KeyValue(key='observations_received', value=str(arm.received)),
            KeyValue(key='actions_published', value=str(arm.published)),
            KeyValue(key='dropped_observations', value=str(arm.buffer.dropped)),
            KeyValue(key='stale_observations', value=str(arm.stale)),
            KeyValue(key='rejected_observations', value=str(arm.rejected)),
            KeyValue(key='median_latency_ms', value=_median(arm.latency_ms)),
            KeyValue(key='median_inference_ms', value=_median(arm.inference_ms)),
            KeyValue(key='last_error', value=arm.last_error)]
        return status


def _median(values: Sequence[float] | collections.deque) -> str:
    return f'{np.median(values):.1f}' if len(values) else 'nan'


def _autostart(node: VlaNode) -> None:
    if node.p['autostart'] and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()


def main(args: list[str] | None = None) -> None:
    """Run the VLA node until SIGINT/SIGTERM; with autostart it configures and activates."""
    run_node(VlaNode, args, on_start=_autostart, on_stop=lambda node: node._stop_worker())


if __name__ == '__main__':
    main()
