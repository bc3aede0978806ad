"""Graph tests of the VLA node as its own process, on a tiny checkpoint through the real policy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus

from vla_ros.core.image import encode_image
from vla_ros.msg import Observation, VlaAction
from vla_ros.nodes import qos
from vla_ros.testing import NodeProcess, node_processes, rclpy_context, ros_env, spin_until

pytestmark = pytest.mark.graph


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vla_ros.policy.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny')


def _observation(node, rgb: np.ndarray, episode: int, text: str) -> Observation:  # noqa: ANN001
    msg = Observation()
    msg.header.stamp = node.get_clock().now().to_msg()
    msg.header.frame_id = 'camera'
    data, h, w, enc, step = encode_image(rgb)
    msg.image.height, msg.image.width, msg.image.encoding, msg.image.step = h, w, enc, step
    msg.image.data = data
    msg.instruction, msg.episode_id = text, episode
    return msg


class Harness:
    def __init__(self, ctx) -> None:  # noqa: ANN001
        self.node = rclpy.create_node('vla_test', namespace='vla', context=ctx)
        self.obs_pub = self.node.create_publisher(Observation, 'observation', qos.LATEST)
        self.actions: list[VlaAction] = []
        self.diags: list[DiagnosticArray] = []
        self.node.create_subscription(VlaAction, 'action', self.actions.append, qos.ACTION)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self.diags.append, 10)
        self.ex = rclpy.executors.SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.node)

    def spin_until(self, pred, timeout: float) -> bool:  # noqa: ANN001
        return spin_until(self.ex, pred, timeout)


def _start(domain_id: int, model_path: str) -> NodeProcess:
    return NodeProcess('vla_ros.nodes.vla_node',
                       ['--ros-args', '-r', '__ns:=/vla', '-r', 'diagnostics:=/diagnostics',
                        '-p', f'model_path:={model_path}', '-p', 'unnorm_key:=bridge_orig',
                        '-p', 'device:=cpu'], env=ros_env(domain_id))


def test_publishes_one_stamped_action_per_processed_observation(
        domain_id: int, tiny_checkpoint: Path) -> None:
    proc = _start(domain_id, str(tiny_checkpoint))
    rng = np.random.default_rng(0)
    with node_processes(proc), rclpy_context(domain_id) as ctx:
        h = Harness(ctx)
        assert proc.wait_for_output('vla node active', 60), proc.output
        assert h.spin_until(lambda: h.obs_pub.get_subscription_count() > 0, 20)
        sent = _observation(h.node, rng.integers(0, 256, (224, 224, 3), np.uint8), 1,
                            'move to the red block')
        h.obs_pub.publish(sent)
        assert h.spin_until(lambda: h.actions, 60), proc.output
        a = h.actions[0]
        assert (a.header.stamp.sec, a.header.stamp.nanosec) == (sent.header.stamp.sec,
                                                                sent.header.stamp.nanosec)
        assert a.episode_id == 1 and a.instruction == 'move to the red block'
        assert np.all(np.isfinite(a.delta)) and np.all(np.abs(a.normalized) <= 1.0)
        assert a.inference_ms > 0
        from vla_ros.policy.policy import OpenVLAPolicy
        policy = OpenVLAPolicy.from_pretrained(tiny_checkpoint, unnorm_key='bridge_orig')
        lo, hi = policy.action_tokenizer.action_token_range
        assert np.all((a.token_ids >= lo) & (a.token_ids <= hi))
        img = np.frombuffer(bytes(sent.image.data), np.uint8).reshape(224, 224, 3)
        expected = policy.predict(img, sent.instruction)
        np.testing.assert_array_equal(a.token_ids, expected.token_ids)
        np.testing.assert_allclose(a.delta, expected.action, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(a.token_probs, expected.token_probs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.token_margins, expected.token_margins, rtol=1e-5,
                                   atol=1e-7)
        assert np.all((a.token_margins >= 0) & (a.token_probs <= 1)) and a.token_probs.min() > 0

        # A burst of observations: the latest wins, no backlog builds up.
        h.actions.clear()
        for _ in range(20):
            h.obs_pub.publish(_observation(h.node, rng.integers(0, 256, (224, 224, 3),
                                                                np.uint8), 2, 'wipe'))
            h.ex.spin_once(timeout_sec=0.0)
        h.spin_until(lambda: False, 4.0)
        assert 1 <= len(h.actions) < 20, f'{len(h.actions)} actions for a burst of 20'
        assert all(a.episode_id == 2 for a in h.actions)
        h.node.destroy_node()


def test_missing_model_keeps_node_alive_and_reports(domain_id: int, tmp_path: Path) -> None:
    missing = tmp_path / 'no_such_checkpoint'
    proc = _start(domain_id, str(missing))
    with node_processes(proc), rclpy_context(domain_id) as ctx:
        h = Harness(ctx)
        assert proc.wait_for_output('model load failed', 60), proc.output

        def error_reported() -> bool:
            return any(s.level == DiagnosticStatus.ERROR and 'no_such_checkpoint' in s.message
                       for d in h.diags for s in d.status)

        assert h.spin_until(error_reported, 10), proc.output
        assert h.spin_until(lambda: h.obs_pub.get_subscription_count() > 0, 10)
        h.obs_pub.publish(_observation(h.node, np.zeros((224, 224, 3), np.uint8), 1, 'go'))
        h.spin_until(lambda: h.actions, 2.0)
        assert not h.actions and proc.alive()
        h.node.destroy_node()
