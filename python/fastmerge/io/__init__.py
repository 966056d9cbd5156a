"""Checkpoint input and output: a lazy, validating reader of safetensors (and, when allowed,
pickle) checkpoints; a sharded safetensors writer with bounded memory; an atomic, resumable
output directory."""
from .reader import CheckpointReader, TensorInfo
from .staging import StagedOutput
from .writer import OutputTensor, ShardedWriter

__all__ = ["CheckpointReader", "TensorInfo", "OutputTensor", "ShardedWriter", "StagedOutput"]
