"""Shadow mode's comparison: the would-be command against a reference twist stream.

In shadow mode the safety node runs the full pipeline but commands the arm nothing; every
accepted action's limited twist is compared here with the newest reference twist (a teleop
stream on a real arm, the scripted expert in the simulator) that is at most
``reference_timeout`` old: the per-axis mean absolute error, the direction agreement (the share of
comparisons in which both move and the linear parts point into the same half-space, and the mean
cosine between them), and how often the limiter would have intervened (the share of accepted
actions it changed beyond the acceleration ramp). The would-be twist of an action is
``SafetyLimiter.would_be``: what the command ramps to. ``ShadowStats`` keeps running sums, so
the live figures in ``SafetyStatus`` and the offline report of ``vla-ros shadow-report`` (from
the audit log's action records) come from the same code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ['ShadowStats', 'format_report', 'intervened', 'read_audit', 'report_from_audit']

#: A twist part slower than this [m/s or rad/s] counts as not moving for direction agreement.
MOVING = 1e-3


def intervened(limits: Iterable[str]) -> bool:
    """Whether the limits applied to an action changed it beyond the acceleration ramp."""
    return any(not x.startswith('accel:') or x.endswith('cannot_brake') for x in limits)


@dataclass
class ShadowStats:
    """Running comparison of would-be commands with a reference (see the module docstring)."""

    actions: int = 0  #: accepted actions seen
    interventions: int = 0  #: accepted actions the limiter changed
    samples: int = 0  #: comparisons with a fresh reference
    moving: int = 0  #: comparisons in which both linear parts move
    agree: int = 0  #: ... and point into the same half-space
    cosine_sum: float = 0.0
    abs_error_sum: np.ndarray = field(default_factory=lambda: np.zeros(6))

    def add(self, command: np.ndarray, reference: np.ndarray | None, limited: bool) -> None:
        """Add one accepted action: its would-be twist, the reference (None: none fresh)."""
        self.actions += 1
        self.interventions += bool(limited)
        if reference is None:
            return
        cmd = np.asarray(command, dtype=float)
        ref = np.asarray(reference, dtype=float)
        if cmd.shape != (6,) or ref.shape != (6,) or not (np.isfinite(cmd).all()
                                                          and np.isfinite(ref).all()):
            return
        self.samples += 1
        self.abs_error_sum += np.abs(cmd - ref)
        a, b = cmd[:3], ref[:3]
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na > MOVING and nb > MOVING:
            self.moving += 1
            cos = float(a @ b) / (na * nb)
            self.cosine_sum += cos
            self.agree += cos > 0.0

    def summary(self) -> dict[str, Any]:
        """Return the figures (NaN where nothing was compared yet)."""
        n = self.samples
        return {
            'actions': self.actions,
            'samples': n,
            'moving_samples': self.moving,
            'mean_abs_error': (self.abs_error_sum / n).tolist() if n else [math.nan] * 6,
            'direction_agreement': self.agree / self.moving if self.moving else math.nan,
            'mean_cosine': self.cosine_sum / self.moving if self.moving else math.nan,
            'intervention_rate': self.interventions / self.actions if self.actions else math.nan,
        }


def report_from_audit(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Recompute the shadow figures from audit-log records (one dict per JSON line).

    Only accepted action records count; their ``shadow.reference`` (the reference twist at that
    time, or None) is compared with ``output.would_be`` (the would-be twist).
    """
    stats = ShadowStats()
    for r in records:
        if r.get('event') != 'action' or not r.get('accepted'):
            continue
        shadow = r.get('shadow') or {}
        ref = shadow.get('reference')
        cmd = shadow.get('would_be', r.get('output', {}).get('twist'))
        try:
            cmd_arr = np.asarray(cmd, dtype=float)
            ref_arr = None if ref is None else np.asarray(ref, dtype=float)
        except (TypeError, ValueError):
            continue
        stats.add(cmd_arr, ref_arr, intervened(r.get('limits_applied') or ()))
    return stats.summary()


def read_audit(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return ``report_from_audit`` of an audit-log file; unreadable lines are skipped.

    Raises:
        OSError: the file cannot be read.

    """
    records = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return report_from_audit(records)


def format_report(summary: Mapping[str, Any]) -> str:
    """Return the figures of ``ShadowStats.summary`` as a few lines for an operator."""
    err = summary['mean_abs_error']
    lines = [f"accepted actions: {summary['actions']}, compared with a fresh reference: "
             f"{summary['samples']} (both moving: {summary['moving_samples']})",
             'mean |would-be - reference|: ' + ', '.join(
                 f'{axis} {e:.4f}' for axis, e in zip(('vx', 'vy', 'vz', 'wx', 'wy', 'wz'),
                                                      err, strict=True))
             + ' [m/s, rad/s]',
             f"direction agreement: {summary['direction_agreement']:.3f} (mean cosine "
             f"{summary['mean_cosine']:.3f})",
             f"the limiter would have intervened in {summary['intervention_rate']:.3f} of the "
             'accepted actions']
    return '\n'.join(lines)
