"""Typed exceptions for everything a user can get wrong: configuration, checkpoints, inputs.

Every error names the offending thing (the file, the key, the field) and, where it helps, the
valid choices, so that a log line alone says what to fix. Code never uses ``assert`` for input.
"""


class VlaRosError(Exception):
    """Base class of all vla_ros errors."""


class ConfigError(VlaRosError, ValueError):
    """An invalid configuration value or parameter (names the field and the valid range)."""


class CheckpointError(VlaRosError):
    """A checkpoint directory is missing a file or holds a corrupt or inconsistent one."""


class UnnormKeyError(VlaRosError, LookupError):
    """The ``unnorm_key`` is missing where several datasets exist, or is unknown (lists keys)."""


class ImageError(VlaRosError, ValueError):
    """A malformed image: wrong buffer length, unknown encoding, zero size, wrong dtype/shape."""


class InstructionError(VlaRosError, ValueError):
    """An unusable instruction: empty, too long or not text."""
