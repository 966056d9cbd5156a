"""Error types. Every user-facing failure is a FastmergeError naming what is at fault."""


class FastmergeError(Exception):
    """Base class of every error fastmerge raises on purpose."""


class InvalidArgumentError(FastmergeError, ValueError):
    """An argument has the wrong type, shape, device, dtype or value."""


class ConfigError(FastmergeError, ValueError):
    """A merge configuration (YAML) is malformed, or asks for something fastmerge does not do."""


class MergeInputError(FastmergeError, ValueError):
    """The models of a merge do not fit together (missing tensors, shape mismatch, NaN/Inf)."""


class NativeUnavailableError(FastmergeError, RuntimeError):
    """The compiled extension (or its CUDA part) is not available."""


class NativeKernelError(FastmergeError, RuntimeError):
    """A check inside the compiled kernels failed (raised from C++)."""


class CheckpointError(FastmergeError):
    """An input checkpoint cannot be read (missing, corrupt, or in a refused format)."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model path does not exist, or holds no weights fastmerge can read."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file or its index is truncated, malformed or inconsistent."""


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name is not in a checkpoint."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0]) if self.args else ""


class PickleCheckpointError(CheckpointError):
    """A pickle (.bin) checkpoint was refused: unpickling can run arbitrary code."""


class OutputExistsError(FastmergeError, FileExistsError):
    """The output path exists and overwriting it was not asked for."""


class OutputError(FastmergeError):
    """Writing the output failed (incomplete, mismatched tensor, I/O error)."""
