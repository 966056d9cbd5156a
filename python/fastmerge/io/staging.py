"""The output directory, built in a hidden sibling and renamed into place when complete.

An interrupted run leaves only `.<name>.fastmerge-partial` next to the target: the target never
looks like a finished model until it is one. The partial directory carries a state file (the
fingerprint of what is being merged) and a journal of tensors known to be durable, so a rerun of
the same merge resumes where the last one stopped.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, List, Set, Tuple, Union

from ..errors import OutputError, OutputExistsError

PARTIAL_SUFFIX = ".fastmerge-partial"
STATE_FILE = ".fastmerge-state.json"
JOURNAL_FILE = ".fastmerge-journal"
STATE_VERSION = 1


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_journal(path: Path) -> Tuple[List[str], int]:
    """Names in the journal and the byte length of its complete lines. A final line without a
    newline is a write torn by a crash and is ignored; a damaged line before it is corruption."""
    with open(path, "rb") as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1
    names = []
    for number, line in enumerate(data[:complete].splitlines(), 1):
        try:
            name = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            name = None
        if not isinstance(name, str):
            raise OutputError(f"{path}: line {number} is damaged ({line[:80]!r})")
        names.append(name)
    return names, complete


class StagedOutput:
    """target: the final output directory; fingerprint: a string that changes whenever the
    bytes of the output would (config, inputs, options)."""

    def __init__(self, target: Union[str, os.PathLike], *, fingerprint: str,
                 overwrite: bool = False):
        self.target: Path = Path(target).expanduser().absolute()
        if not self.target.name:
            raise OutputError(f"output path {target!s} has no directory name")
        self.directory: Path = self.target.parent / f".{self.target.name}{PARTIAL_SUFFIX}"
        self.overwrite = overwrite
        self.fingerprint = fingerprint
        self.resumed = False
        self._committed = False
        self._done: Set[str] = set()
        if self._target_occupied() and not overwrite:
            raise OutputExistsError(f"output {self.target} already exists; pass --overwrite "
                                    f"(overwrite=True) to replace it")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if not self._try_resume():
                self._start_fresh()
            self._journal = open(self.directory / JOURNAL_FILE, "ab")
        except OSError as exc:
            raise OutputError(f"{self.directory}: cannot prepare the output directory "
                              f"({exc.strerror or exc})") from exc

    def _target_occupied(self) -> bool:
        """An empty directory counts as free: rename() replaces it atomically."""
        if self.target.is_dir() and not self.target.is_symlink():
            return any(self.target.iterdir())
        return os.path.lexists(self.target)

    def _try_resume(self) -> bool:
        try:
            with open(self.directory / STATE_FILE, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            return False
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            return False
        journal = self.directory / JOURNAL_FILE
        try:
            names, complete = _read_journal(journal)
        except FileNotFoundError:
            names, complete = [], 0
        except OutputError:
            return False  # a damaged journal cannot be trusted: start over
        if journal.exists() and journal.stat().st_size != complete:
            os.truncate(journal, complete)  # so the next append starts on a fresh line
        self._done = set(names)
        self.resumed = True
        return True

    def _start_fresh(self) -> None:
        if self.directory.is_dir() and not self.directory.is_symlink():
            shutil.rmtree(self.directory)
        elif os.path.lexists(self.directory):
            os.unlink(self.directory)
        self.directory.mkdir()
        state = self.directory / STATE_FILE
        with open(state, "w", encoding="utf-8") as f:
            json.dump({"version": STATE_VERSION, "fingerprint": self.fingerprint}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(self.directory)
        _fsync_path(self.directory.parent)

    def done(self) -> Set[str]:
        """Tensors recorded durable, by an earlier run of the same merge or by this one."""
        return set(self._done)

    def record_done(self, names: Iterable[str]) -> None:
        """Journals names as durable. Call writer.flush() first: the journal must never get
        ahead of the data."""
        if self._committed:
            raise OutputError(f"{self.target}: record_done after commit")
        names = [n for n in names if n not in self._done]
        if not names:
            return
        try:
            self._journal.write(b"".join(json.dumps(n).encode("utf-8") + b"\n" for n in names))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except OSError as exc:
            raise OutputError(f"{self.directory / JOURNAL_FILE}: cannot record progress "
                              f"({exc.strerror or exc})") from exc
        self._done.update(names)

    def commit(self) -> None:
        """Makes every file durable, drops the bookkeeping files and renames the directory into
        place (replacing the old target only now, when overwrite was asked for)."""
        if self._committed:
            return
        if self._target_occupied() and not self.overwrite:  # it appeared during the merge
            raise OutputExistsError(f"output {self.target} appeared during the merge; the "
                                    f"result is kept in {self.directory}")
        try:
            self._journal.close()
            for name in (JOURNAL_FILE, STATE_FILE):
                (self.directory / name).unlink(missing_ok=True)
            for root, _dirs, files in os.walk(self.directory):
                for name in files:
                    _fsync_path(Path(root) / name)
                _fsync_path(Path(root))
            self._move_into_place()
            _fsync_path(self.target.parent)
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot move the finished output into place "
                              f"from {self.directory} ({exc.strerror or exc})") from exc
        self._committed = True

    def _move_into_place(self) -> None:
        if not self._target_occupied():
            os.rename(self.directory, self.target)  # replaces an empty directory, if any
            return
        aside = self.target.parent / f".{self.target.name}.fastmerge-old-{os.getpid()}"
        os.rename(self.target, aside)
        try:
            os.rename(self.directory, self.target)
        except OSError:
            os.rename(aside, self.target)  # put the old output back
            raise
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()

    def close(self) -> None:
        """Leaves the partial directory for a later resume (an interrupted run)."""
        if not self._journal.closed:
            self._journal.close()

    def __del__(self):
        journal = getattr(self, "_journal", None)
        if journal is not None and not journal.closed:
            journal.close()
