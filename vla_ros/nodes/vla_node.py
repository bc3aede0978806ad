"""VLA node: ``Observation`` -> OpenVLA -> ``VlaAction``, inference off the executor thread.

A lifecycle node (it holds a GPU): the model is loaded in ``on_configure`` (a failure leaves the
node alive and unconfigured, the reason in ``/diagnostics``, nothing published), inference runs
in ``on_activate`` .. ``on_deactivate``, memory is freed in ``on_cleanup``. With ``autostart``
(default) it configures and activates itself, so plain ``ros2 run`` and the runner need no
lifecycle manager.

The observation callback only writes a size-1 drop-oldest buffer; one worker thread always takes
the freshest observation, runs the policy and publishes one ``VlaAction`` stamped with the frame's
stamp. A new episode id resets the policy. Topics (relative): in ``observation``; out ``action``
(reliable, depth 1, liveliness AUTOMATIC so the safety node sees a dead process) and
``diagnostics``.
"""

from __future__ import annotations

import os
import threading
import time
import traceback

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.lifecycle import LifecycleNode, State, TransitionCallbackReturn

from vla_ros.core.buffer import LatestBuffer
from vla_ros.core.errors import VlaRosError
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
)


class VlaNode(LifecycleNode):
    """Runs the policy on the freshest observation and publishes its action."""

    def __init__(self) -> None:
        super().__init__('vla_node')
        self.p = declare(self, PARAMS)
        if self.p['nice']:
            os.nice(int(self.p['nice']))
        self.policy = None
        self.load_error = ''
        self._observations: LatestBuffer[Observation] = LatestBuffer()
        self._active = threading.Event()
        self._worker: threading.Thread | None = None
        self._episode_id: int | None = None
        self._latencies: list[float] = []
        self.actions_published = 0
        self._action_pub = self.create_publisher(VlaAction, 'action', qos.ACTION)
        self._diag_pub = self.create_publisher(DiagnosticArray, 'diagnostics', 10)
        self.create_subscription(Observation, 'observation', self._observations.put,
                                 qos.LATEST)
        self.create_timer(1.0, self._publish_diagnostics)

    # -- lifecycle -------------------------------------------------------------------------
    def on_configure(self, state: State) -> TransitionCallbackReturn:
        """Load the checkpoint; on failure stay unconfigured and say why in diagnostics."""
        start = time.perf_counter()
        try:
            self.policy = self._load_policy()
            loaded = time.perf_counter()
            # Warm up here, not on the first real frame: compilation (or, on a restart, the
            # compile cache) and graph capture happen now.
            self.policy.warmup()
            self.policy.predict(np.zeros((224, 224, 3), np.uint8), 'warm up')
        except (VlaRosError, OSError, RuntimeError, ImportError, ValueError) as exc:
            self.policy = None
            self.load_error = f'{type(exc).__name__}: {exc}'
            self.get_logger().error(f'model load failed, publishing nothing: {self.load_error}')
            self._publish_diagnostics()
            return TransitionCallbackReturn.FAILURE
        self.load_error = ''
        self.policy.reset()
        now = time.perf_counter()
        self.get_logger().info(f'policy ready in {now - start:.1f} s (load {loaded - start:.1f} '
                               f's, warm-up {now - loaded:.1f} s) on {self.policy.device}')
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        """Start the inference worker."""
        self._observations.clear()
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
        self._active.clear()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None

    def _run(self) -> None:
        while self._active.is_set() and rclpy.ok(context=self.context):
            obs = self._observations.take(timeout=0.1)
            if obs is None or not self._active.is_set():
                continue
            try:
                self._infer(obs)
            except Exception as exc:  # noqa: BLE001 - inference must never kill the node
                self.get_logger().error(f'inference failed, no action published: {exc}\n'
                                        f'{traceback.format_exc(limit=3)}',
                                        throttle_duration_sec=2.0)

    def _infer(self, obs: Observation) -> None:
        age = (self.get_clock().now() - rclpy.time.Time.from_msg(obs.header.stamp)).nanoseconds
        if obs.header.stamp.sec and age * 1e-9 > float(self.p['max_observation_age']):
            self.get_logger().warning(f'skipping an observation {age * 1e-9:.2f} s old',
                                   throttle_duration_sec=2.0)
            return
        if obs.episode_id != self._episode_id:
            self._episode_id = obs.episode_id
            self.policy.reset()
        image = decode_image(obs.image.data, obs.image.height, obs.image.width,
                             obs.image.encoding, obs.image.step)
        start = time.perf_counter()
        out = self.policy.predict(image, obs.instruction)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if not self._active.is_set():
            return
        msg = VlaAction()
        msg.header = obs.header
        msg.header.frame_id = str(self.p['frame_id'])  # the delta's frame, not the camera's
        msg.episode_id = obs.episode_id
        msg.delta = np.asarray(out.action, dtype=np.float64)
        msg.normalized = np.asarray(out.normalized, dtype=np.float64)
        msg.token_ids = np.asarray(out.token_ids, dtype=np.int32)
        msg.token_probs = np.asarray(out.token_probs, dtype=np.float32)
        msg.token_margins = np.asarray(out.token_margins, dtype=np.float32)
        msg.inference_ms = float(out.timings.get('total', elapsed_ms))
        msg.instruction = obs.instruction
        self._action_pub.publish(msg)
        self.actions_published += 1
        self._latencies = (self._latencies + [msg.inference_ms])[-50:]

    # -- diagnostics -----------------------------------------------------------------------
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
        lat = np.median(self._latencies) if self._latencies else float('nan')
        status.values = [KeyValue(key='actions_published', value=str(self.actions_published)),
                         KeyValue(key='median_inference_ms', value=f'{lat:.1f}'),
                         KeyValue(key='dropped_observations',
                                  value=str(self._observations.dropped))]
        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [status]
        self._diag_pub.publish(array)


def _autostart(node: VlaNode) -> None:
    if node.p['autostart'] and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()


def main(args: list[str] | None = None) -> None:
    """Run the VLA node until SIGINT/SIGTERM; with autostart it configures and activates."""
    run_node(VlaNode, args, on_start=_autostart, on_stop=lambda node: node._stop_worker())


if __name__ == '__main__':
    main()
