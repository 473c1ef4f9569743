"""Reading shards: URL expansion and policy, opening with retries; the tar reader itself is ``data/tar.py``.

A shard is a tar file of samples in the webdataset layout: members ``{key}.{ext}``
grouped by key (``a/b.0.jpg`` -> key ``a/b``, ext ``0.jpg``). ``data/tar.py`` says
why the reader is our own (measured against ``tarfile`` and ``webdataset``): damage
is skipped and counted, the rest of a shard is kept, a cut shard is reported, and
samples are numbered so a resumed loader re-reads exactly its buffered samples.

Shard URLs are local paths (brace patterns, several joined by ``::``) or, only
when ``data.allow_shell_urls`` is set, ``pipe:COMMAND`` (the command's stdout
is the tar), which is how object stores are read (``pipe:aws s3 cp s3://b/x.tar -``).
"""

from __future__ import annotations

import multiprocessing
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import braceexpand

from data.tar import ProblemHandler, iter_samples
from mm.schema import resolve_path

SHELL_PREFIX = "pipe:"


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(reason, message)  # both in args: picklable across processes
        self.reason, self.message = reason, message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


class ShardUnavailable(OSError):
    """A shard that could not be opened after the configured retries."""


# ---- URLs -------------------------------------------------------------------------
def expand_shards(pattern: str, allow_shell: bool = False) -> list[str]:
    """Brace-expand ``pattern`` (``::`` joins several) and check every shard.

    Local shards must exist (the error names the first missing one); ``pipe:``
    commands need ``allow_shell``; other URL schemes are refused with a hint.
    """
    urls: list[str] = []
    for part in pattern.split("::"):
        urls += list(braceexpand.braceexpand(part.strip()))
    if not urls or urls == [""]:
        raise ValueError(f"shard pattern {pattern!r} names no shard")
    out, missing = [], []
    for url in urls:
        if url.startswith(SHELL_PREFIX):
            if not allow_shell:
                raise ValueError(
                    f"shard URL {url!r} runs a shell command; set data.allow_shell_urls=true to allow that"
                )
            out.append(url)
            continue
        if "://" in url and not url.startswith("file://"):
            raise ValueError(
                f"shard URL {url!r}: only local paths are read directly; stream remote shards through a command, "
                f"e.g. 'pipe:curl -sL {url}', with data.allow_shell_urls=true"
            )
        path = str(resolve_path(url.removeprefix("file://")))
        out.append(path)
        if not Path(path).is_file():
            missing.append(path)
    if missing:
        globbed = [m for m in missing if any(c in m for c in "*?[")]
        hint = (
            f"; glob patterns are not supported ({globbed[0]!r} was read as a file name): list the shards with a "
            "brace pattern such as dir/shard-{000000..000099}.tar, or join several with '::'"
            if globbed else ""
        )  # fmt: skip
        raise FileNotFoundError(f"{len(missing)} shard(s) of {pattern!r} not found, e.g. {missing[0]}{hint}")
    return out


@contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """A readable binary stream of the shard's bytes (a file, or a command's stdout)."""
    if not url.startswith(SHELL_PREFIX):
        with open(url, "rb", buffering=1 << 20) as f:
            yield f
        return
    cmd = url[len(SHELL_PREFIX) :]
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)  # noqa: S602 - opted in
    completed = False
    try:
        yield proc.stdout
        completed = True
    finally:
        proc.stdout.close()
        if not completed:  # we stopped reading early (resume, shutdown): the command's exit status is ours
            proc.kill()
        if proc.wait() != 0 and completed:  # the reader has reported a short stream; say which command failed
            raise ShardUnavailable(f"command {shlex.quote(cmd)} exited with status {proc.returncode}")


def check_openable(url: str, retries: int, delay_s: float) -> None:
    """Open a local shard, retrying with exponential backoff (shared storage hiccups); raise :class:`ShardUnavailable`.

    A ``pipe:`` command's failure only shows when it is read (the reader reports it).
    """
    if url.startswith(SHELL_PREFIX):
        return
    for attempt in range(retries + 1):
        try:
            with open(url, "rb"):
                return
        except OSError as e:
            if attempt == retries:
                raise ShardUnavailable(f"{url}: {e.strerror or e} (after {retries} retries)") from None
            time.sleep(delay_s * 2**attempt)


def read_shard(
    url: str, on_problem: ProblemHandler, wanted: Callable[[int], bool] = lambda o: True, whole: bool = True
) -> Iterator[tuple[int, dict]]:
    """:func:`iter_samples` of the shard at ``url``; a ``whole`` shard read through that yields no sample
    (an empty tar, or every member damaged) is a counted skip (``empty_shard``), like a damaged sample."""
    n = 0
    with open_shard(url) as f:
        for item in iter_samples(f, on_problem, wanted):
            n += 1
            yield item
    if whole and n == 0:
        on_problem("empty_shard", f"{url}: no readable sample")


def shard_has_sample(url: str, retries: int = 0, delay_s: float = 1.0) -> bool:
    """Whether the shard yields at least one sample (read up to the first); missing or unreadable: False."""
    found = False
    try:
        check_openable(url, retries, delay_s)
        with open_shard(url) as f:
            found = next(iter_samples(f, lambda reason, message: None), None) is not None
    except OSError:  # a pipe: command we stopped reading early exits with an error; what was found stands
        pass
    return found


def any_shard_has_sample(urls: list[str] | tuple[str, ...], retries: int = 0, delay_s: float = 1.0) -> bool:
    """Whether any shard yields a sample: each asked once without retries (stopping at the first that does); if
    none does, the first again with ``retries`` (a storage hiccup hits every shard alike), so a source of many
    missing shards is told in seconds, not after every shard's backoff."""
    return any(shard_has_sample(url) for url in urls) or (bool(urls) and shard_has_sample(urls[0], retries, delay_s))


# ---- what each DataLoader worker process is reading (the main process names it when one stalls) ----
class ReadingBoard:
    """One line of shared memory per DataLoader worker process, holding the shard it is reading now.

    The main process cannot look into a worker: when one stops producing batches, this
    is how the error can say which shard it was reading. Created before the workers
    start (they inherit it); each worker ``attach``es its slot and ``note_reading`` writes it.
    """

    WIDTH = 1024

    def __init__(self, workers: int):
        self.slots = [multiprocessing.RawArray("c", self.WIDTH) for _ in range(workers)]

    def attach(self, worker: int) -> None:
        """In worker process ``worker``: later ``note_reading`` calls of this process write its slot."""
        global _READING_SLOT
        _READING_SLOT = self.slots[worker]

    def read(self, worker: int) -> str:
        return self.slots[worker].value.decode("utf-8", "replace")


_READING_SLOT = None  # this process's slot of a ReadingBoard (DataLoader workers only)


def note_reading(label: bytes) -> None:
    """Record what this worker reads now (a shard URL and its source); free outside DataLoader workers."""
    if _READING_SLOT is not None:
        _READING_SLOT.value = label[: ReadingBoard.WIDTH - 1]


def read_samples(pattern: str, allow_shell: bool = False) -> Iterator[dict]:
    """Every raw sample of the shards, in order (evaluation, tests); any tar problem raises."""

    def fail(reason: str, message: str) -> None:
        raise ValueError(f"{reason}: {message}")

    for url in expand_shards(pattern, allow_shell):
        with open_shard(url) as f:
            for _, sample in iter_samples(f, fail):
                yield sample
