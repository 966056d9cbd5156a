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
