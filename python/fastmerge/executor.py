"""Streams a planned merge: read the next tensor group on a background thread while the
current one merges, write each result in place into pre-planned output shards, and record
progress so an interrupted run resumes where it stopped.

Memory stays bounded by the inputs of the group being merged plus those prefetched (up to
PREFETCH_BYTES, or the next group when that alone is larger), plus the outputs waiting to be
written (at most two): about twice the largest tensor group, never the whole model. Inputs are
read-only mappings of the checkpoint pages, unmapped as soon as their group is merged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import resource
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from . import __version__, host_kernels
from .config import MergeConfig, load_config
from .errors import (FastmergeError, InvalidArgumentError, MergeInputError, ModelNotFoundError,
                     OutputError)
from .io import CheckpointReader, OutputTensor, ShardedWriter, StagedOutput
from .methods import MergeCall, get_method
from .output_files import merged_model_config, write_model_files
from .plan import MergePlan, Planner, TensorJob

PREFETCH_BYTES = 64 << 20
DURABLE_EVERY_BYTES = 1 << 30  # fsync + journal this often (bounded redo after a crash)


@dataclass
class MergeOptions:
    device: str = "cpu"
    threads: Optional[int] = None
    out_shard_size: int = 5 * 10**9
    overwrite: bool = False
    allow_pickle: bool = False
    check_finite: bool = False
    seed: int = 0
    quiet: bool = False


@dataclass
class MergeSummary:
    output: Path
    method: str
    tensors: int
    tensors_merged: int      # this run (fewer than tensors after a resume)
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    resumed: bool

    @property
    def gbs(self) -> float:
        return (self.bytes_read + self.bytes_written) / max(self.seconds, 1e-9) / 1e9


def reset_peak_rss() -> None:
    """Start a fresh peak-memory measurement for this process (Linux: clear_refs 5 resets
    VmHWM); elsewhere the peak stays the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory since reset_peak_rss() (or since the process started)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_model_path(name: str, config: MergeConfig) -> Path:
    """A model as written in the config: relative to the working directory (as mergekit
    reads it), else relative to the config file."""
    candidates = [Path(name).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(config.directory / name)
    for path in candidates:
        if path.exists():
            return path
    tried = " or ".join(dict.fromkeys(str(p.resolve()) for p in candidates))
    message = f"model {name!r} not found (looked for {tried})"
    if _looks_like_hub_id(name):
        message += (f"; fastmerge reads local checkpoints: download hub models first "
                    f"(e.g. `huggingface-cli download {name} --local-dir DIR`)")
    raise ModelNotFoundError(message)


def _looks_like_hub_id(name: str) -> bool:
    """'org/model' or 'model', not a path written as one ('./x', '../x', '/x', '~/x')."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def fingerprint(config: MergeConfig, readers: Dict[str, CheckpointReader], options: MergeOptions) -> str:
    """What the output depends on: config, options that change bytes, and the input files."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": __version__, "config": config.text, "seed": options.seed,
                         "shard": options.out_shard_size}).encode())
    for name in sorted(readers):
        for file in sorted({str(readers[name].info(t).file) for t in readers[name].names()}):
            st = os.stat(file)
            h.update(f"{name}|{file}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


class _Prefetcher:
    """Loads the inputs of upcoming jobs on a background thread, in plan order."""

    _DONE = object()

    def __init__(self, jobs: Sequence[TensorJob], readers: Dict[str, CheckpointReader],
                 check_finite: bool, device: str, host_kernels_merge: bool = True):
        self._jobs = jobs
        self._readers = readers
        self._check_finite = check_finite
        self._cuda = device != "cpu"
        self._device = device
        self._host_merge = host_kernels_merge  # the method merges HostArrays
        self._queue: "queue.Queue" = queue.Queue()
        self._bytes_ahead = 0
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fastmerge-prefetch", daemon=True)
        self._thread.start()

    def _load(self, job: TensorJob) -> list:
        """The job's inputs: HostArrays mapped from the page cache when the host kernels can
        merge them (no torch), else torch tensors (CUDA: read into pinned memory, for fast
        transfer)."""
        host = not self._cuda and (job.copy_only or (self._host_merge and host_kernels.supports(
            [x.dtype for x in job.inputs] + [job.out_dtype])))
        tensors = []
        for x in job.inputs:
            reader = self._readers[x.model]
            if host:
                t = reader.get_array(x.tensor, mapped=True)
            else:
                t = reader.get(x.tensor, mapped=not self._cuda, pinned=self._cuda)
            if x.rows is not None:  # a leading block of rows: still one contiguous view
                t = host_kernels.HostArray(t.data[:x.rows], t.dtype) if host else t[:x.rows]
            if self._check_finite and x.dtype.is_floating_point:
                bad = host_kernels.count_non_finite(t)
                if bad:
                    raise MergeInputError(f"tensor {x.tensor} of model {x.model} "
                                          f"({reader.info(x.tensor).file}) has {bad} NaN/Inf "
                                          f"value(s)")
            tensors.append(t)
        return tensors

    def _run(self) -> None:
        try:
            if self._cuda:
                # Pinning allocates through the thread's current device: without this, a run on
                # cuda:N would also open a context (hundreds of MB) on GPU 0.
                import torch

                torch.cuda.set_device(torch.device(self._device))
            for job in self._jobs:
                with self._lock:  # wait for room: at most PREFETCH_BYTES ahead, or one group
                    while not self._stop and self._bytes_ahead > 0 and (
                            self._bytes_ahead + job.nbytes_in > PREFETCH_BYTES):
                        self._lock.wait()
                    if self._stop:
                        return
                    self._bytes_ahead += job.nbytes_in
                self._queue.put((job, self._load(job)))
            self._queue.put((self._DONE, None))
        except BaseException as exc:  # surfaces in the consumer
            self._queue.put((exc, None))

    def __iter__(self):
        while True:
            job, tensors = self._queue.get()
            if job is self._DONE:
                return
            if isinstance(job, BaseException):
                raise job
            yield job, tensors
            del tensors  # the consumer is done with them: unmap before the next group loads
            with self._lock:
                self._bytes_ahead -= job.nbytes_in
                self._lock.notify_all()

    def close(self, wait_s: float = 10.0) -> None:
        """Stops the thread and waits for the load in flight (at most wait_s): the caller
        closes the readers next, and a read still running would use their descriptors."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=wait_s)


class _WriteBehind:
    """Writes merged tensors on a background thread, one group behind the merging, and makes
    them durable (fsync, then the journal) every DURABLE_EVERY_BYTES. An error in the thread
    is raised in the caller at its next submit() or close()."""

    def __init__(self, writer: ShardedWriter, staging: StagedOutput):
        self._writer = writer
        self._staging = staging
        self._queue: "queue.Queue" = queue.Queue(maxsize=1)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="fastmerge-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: List[str] = []
        since_durable = 0
        stopped = False  # the producer's None has been taken
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    stopped = True
                    break
                job, tensor = item
                self._writer.write(job.name, tensor)
                del item, tensor
                pending.append(job.name)
                since_durable += job.nbytes_out
                if since_durable >= DURABLE_EVERY_BYTES:
                    self._make_durable(pending)
                    pending, since_durable = [], 0
            self._make_durable(pending)
        except BaseException as exc:
            self._error = exc
            # Unblock the producer until it stops, unless it already has: the last flush
            # (after its None) failing must not wait for a None that never comes.
            while not stopped:
                stopped = self._queue.get() is None

    def _make_durable(self, names: List[str]) -> None:
        self._writer.flush()
        self._staging.record_done(names)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: TensorJob, tensor) -> None:
        self._raise_if_failed()
        self._queue.put((job, tensor))

    def close(self) -> None:
        """Waits until every submitted tensor is written and durable."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abandon(self) -> None:
        """After an error in the caller: stop the thread without waiting for more work."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def _merge_job(job: TensorJob, tensors: list, config: MergeConfig, options: MergeOptions):
    if job.copy_only:
        return tensors[0]
    if options.device != "cpu":
        tensors = [t.to(options.device, non_blocking=True) for t in tensors]
    method = get_method(config.merge_method)
    if method.splits_base(job.base_index is not None):
        b = job.base_index
        base = tensors[b]
        others = tensors[:b] + tensors[b + 1:]
        params = list(job.per_input[:b]) + list(job.per_input[b + 1:])
    else:
        base, others, params = None, tensors, list(job.per_input)
    call = MergeCall(job.name, base, others, dict(job.shared), [dict(p) for p in params],
                     options.seed, job.out_dtype)
    try:
        out = method.merge(call)
    except FastmergeError as exc:
        raise type(exc)(f"tensor {job.name}: {exc}") from None
    if options.device != "cpu":
        out = out.to("cpu")
    return out


def _progress(total_bytes: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000,
                desc="merging", disable=quiet, dynamic_ncols=True, leave=False)


def _check_device(options: MergeOptions) -> None:
    if options.device != "cpu":
        import torch  # before _C: CUDA merges run on torch tensors

        try:
            device = torch.device(options.device)
        except RuntimeError:
            raise InvalidArgumentError(f"--device {options.device!r} is not a torch device") from None
        if device.type != "cuda":
            raise InvalidArgumentError(f"--device {options.device}: expected cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            raise InvalidArgumentError(f"--device {options.device}: torch sees no CUDA device here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"--device {options.device}: torch sees "
                                       f"{torch.cuda.device_count()} CUDA device(s)")


# Thread counts are process-wide, while several run_merge calls may overlap (threads of one
# process): the first one in saves the caller's counts and the last one out restores them.
_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved: tuple = (None, None)


def _set_cpu_threads(torch, kernels: Optional[int], torch_count: Optional[int]) -> None:
    from ._native import set_num_threads

    if kernels is not None:
        set_num_threads(kernels)
    if torch is not None and torch_count is not None:
        torch.set_num_threads(torch_count)


@contextlib.contextmanager
def _cpu_threads(count: Optional[int]):
    """CPU threads for torch and the kernels during a merge, restored afterwards: run_merge is
    also a library call, and the caller's thread counts are not its to keep."""
    global _threads_users, _threads_saved
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidArgumentError(f"threads must be a positive int, got {count!r}")
    from ._native import available, requested_num_threads

    torch = sys.modules.get("torch")  # not imported by torch-free CPU runs
    with _threads_lock:
        if _threads_users == 0:  # the kernels' own setting (0: unset), not its current value
            _threads_saved = (requested_num_threads() if available() else None,
                              torch.get_num_threads() if torch else None)
        elif torch is not None and _threads_saved[1] is None:  # torch came after the first run
            _threads_saved = (_threads_saved[0], torch.get_num_threads())
        try:
            _set_cpu_threads(torch, count if available() else None, count)
        except BaseException:
            if _threads_users == 0:
                _set_cpu_threads(torch, *_threads_saved)
            raise
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:  # torch may have been imported by a run since
                _set_cpu_threads(sys.modules.get("torch"), *_threads_saved)


def run_merge(config: Union[MergeConfig, str, os.PathLike], out_dir: Union[str, os.PathLike],
              options: Optional[MergeOptions] = None) -> MergeSummary:
    options = options or MergeOptions()
    started = time.perf_counter()
    reset_peak_rss()
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    _check_device(options)
    _check_output_spares_inputs(config, out_dir)
    with _cpu_threads(options.threads):
        return _run_merge(config, out_dir, options, started)


def _check_output_spares_inputs(config: MergeConfig, out_dir: Union[str, os.PathLike]) -> None:
    """The output replaces its directory when done (with --overwrite): it must not be, or
    contain, a model the merge reads."""
    out = Path(out_dir).expanduser().resolve()
    for name in config.referenced_models():
        path = resolve_model_path(name, config).resolve()
        model_dir = path if path.is_dir() else path.parent
        if model_dir == out or out in model_dir.parents:
            raise OutputError(f"output directory {out_dir} would replace the input model {name} "
                              f"({model_dir}); write the merge somewhere else")


def _run_merge(config: MergeConfig, out_dir: Union[str, os.PathLike], options: MergeOptions,
               started: float) -> MergeSummary:
    if get_method(config.merge_method).inputs == "lora":
        from .lora_merge import run_lora_merge  # the models are PEFT LoRA adapters

        return run_lora_merge(config, out_dir, options)

    readers = {m: CheckpointReader(resolve_model_path(m, config), allow_pickle=options.allow_pickle)
               for m in config.referenced_models()}
    try:
        plan: MergePlan = Planner(config, readers).plan()
        merged_model_config(config, readers, plan)  # refuses an unwritable config.json now
        staging = StagedOutput(out_dir, fingerprint=fingerprint(config, readers, options),
                               overwrite=options.overwrite)
        planned = [OutputTensor(j.name, j.shape, j.out_dtype) for j in plan.jobs]
        writer = ShardedWriter(staging.directory, planned, max_shard_bytes=options.out_shard_size,
                               metadata={"format": "pt", "merged_with": f"fastmerge {__version__}"},
                               resume=staging.resumed,
                               already_written=staging.done() if staging.resumed else ())
        done = writer.written()  # durable from an interrupted earlier run of the same merge
        todo = [j for j in plan.jobs if j.name not in done]
        bar = _progress(sum(j.nbytes_in for j in todo), options.quiet)
        prefetch = _Prefetcher(todo, readers, options.check_finite, options.device,
                               get_method(config.merge_method).host_kernels)
        write_behind = _WriteBehind(writer, staging)
        try:
            for count, (job, tensors) in enumerate(prefetch, 1):
                out = _merge_job(job, tensors, config, options)
                del tensors
                write_behind.submit(job, out)  # written while the next group merges
                del out
                bar.update(job.nbytes_in)
                elapsed = bar.format_dict.get("elapsed") or 1e-9
                bar.set_postfix_str(f"{count / elapsed:.0f} tensors/s", refresh=False)
            write_behind.close()
        finally:
            write_behind.abandon()
            prefetch.close()
            bar.close()
        bytes_read = sum(j.nbytes_in for j in todo)
        bytes_written = sum(j.nbytes_out for j in todo)
        writer.finish()
        write_model_files(staging.directory, config, readers, plan)
        staging.commit()
    finally:
        for r in readers.values():
            r.close()
    return MergeSummary(
        output=Path(out_dir), method=config.merge_method, tensors=len(plan.jobs),
        tensors_merged=len(todo), bytes_read=bytes_read, bytes_written=bytes_written,
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        resumed=staging.resumed)
