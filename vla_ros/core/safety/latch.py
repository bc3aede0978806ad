"""The persisted stop latch: a small file that outlives the safety node process.

While an e-stop or a protective stop is latched the file exists and holds one JSON object (the
reason, when and by whom); a restarted node reads it and comes back latched. It is written to a
temporary file in the same folder, fsync'd, renamed over the old one and the folder fsync'd, so
that a crash leaves either the old or the new file, never half of one; ``clear`` unlinks it and
fsyncs the folder. A file that exists but cannot be read or parsed counts as latched (fail
closed), with a reason that names it. The default path lies in the user's state folder
(``$XDG_STATE_HOME``, else ``~/.local/state``), keyed by the node's namespace and name.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

__all__ = ['LatchError', 'LatchFile', 'default_latch_path']

logger = logging.getLogger(__name__)

#: Largest latch file read [bytes]; a bigger one is corrupt.
MAX_LATCH_BYTES = 65536


class LatchError(OSError):
    """The latch file could not be written or removed (names the file and the cause)."""


def default_latch_path(fully_qualified_name: str) -> Path:
    """Return ``<state dir>/vla_ros/<namespace and node name>.latch`` for a node name."""
    base = os.environ.get('XDG_STATE_HOME') or str(Path.home() / '.local' / 'state')
    key = re.sub(r'[^A-Za-z0-9_.-]+', '__', fully_qualified_name.strip('/')) or 'safety_node'
    return Path(base) / 'vla_ros' / f'{key}.latch'


class LatchFile:
    """One latch file: ``read`` the held reason (or None), ``write`` one, ``clear`` it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Use ``path`` (created on the first ``write``; its folder too)."""
        self.path = Path(path)

    def read(self) -> str | None:
        """Return the latched reason, or None when no latch is held.

        Never raises: a file that exists but is unreadable, too large or not a latch record
        returns a reason saying so (the caller stays latched).
        """
        try:
            with open(self.path, 'rb') as f:
                raw = f.read(MAX_LATCH_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f'latch file {str(self.path)!r} unreadable ({exc}): fail closed'
        try:
            if len(raw) > MAX_LATCH_BYTES:
                raise ValueError(f'larger than {MAX_LATCH_BYTES} bytes')
            record = json.loads(raw.decode('utf-8'))
            reason = record['reason']
            if not isinstance(reason, str) or not reason:
                raise ValueError('no reason')
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            return f'latch file {str(self.path)!r} corrupt ({exc}): fail closed'
        return reason

    def write(self, reason: str, who: str = '') -> None:
        """Persist ``reason`` atomically and durably (fsync of the file and its folder).

        Raises:
            LatchError: the folder or the file could not be written.

        """
        record = {'reason': reason, 'latched_at': time.time(), 'by': who}
        tmp = self.path.with_name(f'.{self.path.name}.{os.getpid()}.tmp')
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, json.dumps(record).encode('utf-8'))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self._sync_folder()
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                logger.debug('could not remove %s', tmp)
            raise LatchError(f'cannot write latch file {str(self.path)!r}: {exc}') from exc

    def clear(self) -> None:
        """Remove the latch (durably); no file is fine.

        Raises:
            LatchError: the file exists and could not be removed.

        """
        try:
            self.path.unlink(missing_ok=True)
            if self.path.parent.is_dir():
                self._sync_folder()
        except OSError as exc:
            raise LatchError(f'cannot remove latch file {str(self.path)!r}: {exc}') from exc

    def _sync_folder(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
