"""Reading shards: URL expansion and policy, opening with retries, and a strict tar reader.

A shard is a tar file of samples in the webdataset layout: members ``{key}.{ext}``
grouped by key (``a/b.0.jpg`` -> key ``a/b``, ext ``0.jpg``). The reader here is
our own (about a hundred lines) rather than ``tarfile`` because a training stream
needs what ``tarfile``'s stream mode does not give:

* a corrupt member header (bad checksum) is reported and skipped: the reader
  scans forward to the next valid header and keeps the rest of the shard
  (``tarfile`` silently ends the archive there, losing every later sample);
* a shard cut short (no end-of-archive blocks) is reported, not taken as complete;
* samples are numbered (their *ordinal* in the shard) and samples that are not
  wanted are skipped without reading their payload, so a resumed loader can
  re-read exactly the samples its buffers held.

Shard URLs are local paths (brace patterns, several joined by ``::``) or, only
when ``data.allow_shell_urls`` is set, ``pipe:COMMAND`` (the command's stdout
is the tar), which is how object stores are read (``pipe:aws s3 cp s3://b/x.tar -``).
"""

from __future__ import annotations

import os
import shlex
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import braceexpand

from mm.schema import resolve_path

BLOCK = 512
SHELL_PREFIX = "pipe:"
ProblemHandler = Callable[[str, str], None]  # (reason, message)
BROKEN = ""  # member name iter_members yields after a problem: drop the sample being built


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
        raise FileNotFoundError(f"{len(missing)} shard(s) of {pattern!r} not found, e.g. {missing[0]}")
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


# ---- the tar reader ---------------------------------------------------------------------
def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    signed = sum(struct.unpack("148b8x356b", block)) + 8 * 32  # some old tars sum signed bytes
    return stored == signed


def _size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.replace(b"\0", b" ").strip() or b"0", 8)


def _skip(f: BinaryIO, n: int) -> None:
    """Move past ``n`` bytes without keeping them (seek on files, read and drop on pipes)."""
    if f.seekable():
        f.seek(n, os.SEEK_CUR)
        return
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            return  # the short stream shows at the next header read
        n -= len(chunk)


def _pax_records(payload: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(payload) and payload[i : i + 1] != b"\0":
        length = int(payload[i : payload.index(b" ", i)])
        key, _, value = payload[payload.index(b" ", i) + 1 : i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def iter_members(
    f: BinaryIO, want: Callable[[str], bool], on_problem: ProblemHandler
) -> Iterator[tuple[str, bytes | None]]:
    """(name, payload) of every regular member; payload is None where ``want(name)`` is False (not read).

    Problems go to ``on_problem(reason, message)``: ``corrupt_member`` (a header
    with a bad checksum; the reader resyncs at the next valid header) and
    ``truncated_shard`` (the bytes end before the end-of-archive blocks). After
    either it yields ``(BROKEN, None)``: the sample being built lost members.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    offset = 0  # of the block about to be read, for messages
    while True:
        block = f.read(BLOCK)
        if len(block) < BLOCK:
            on_problem("truncated_shard", f"the shard ends at byte {offset + len(block)} without end-of-archive blocks")
            yield BROKEN, None
            return
        offset += BLOCK
        if block == bytes(BLOCK):
            return  # end of archive
        if not _checksum_ok(block):
            on_problem("corrupt_member", f"bad tar header checksum at byte {offset - BLOCK}; resyncing")
            yield BROKEN, None
            while True:  # resync: the next block that is a valid ustar header
                block = f.read(BLOCK)
                if len(block) < BLOCK:
                    on_problem("truncated_shard", "the shard ends inside a corrupt region")
                    yield BROKEN, None
                    return
                offset += BLOCK
                if block == bytes(BLOCK):
                    return
                if block[257:262] == b"ustar" and _checksum_ok(block):
                    break
        size = _size(block[124:136])
        kind = block[156:157]
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar" and block[345:500].strip(b"\0"):
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        name_s = name.decode("utf-8", "surrogateescape")
        if kind in (b"x", b"L"):  # metadata for the next member (pax record, GNU long name)
            padded = -(-size // BLOCK) * BLOCK
            payload = f.read(padded)
            offset += padded
            if len(payload) < padded:
                on_problem("truncated_shard", f"the shard ends inside an extended header ({name_s!r})")
                yield BROKEN, None
                return
            if kind == b"L":
                long_name = payload[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            try:
                pax = _pax_records(payload[:size])
            except (ValueError, UnicodeDecodeError) as e:
                on_problem("corrupt_member", f"unreadable pax header {name_s!r}: {e!r}")
                yield BROKEN, None
            continue
        size = int(pax.get("size", size))
        name_s = pax.get("path") or long_name or name_s
        long_name, pax = None, {}
        padded = -(-size // BLOCK) * BLOCK
        offset += padded
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers: nothing to yield
            _skip(f, padded)
            continue
        if not want(name_s):
            _skip(f, padded)
            yield name_s, None
            continue
        payload = f.read(padded)
        if len(payload) < size:
            on_problem("truncated_shard", f"the shard ends inside member {name_s!r}")
            yield BROKEN, None
            return
        yield name_s, payload[:size]


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/stem.ext.more`` -> (``dir/stem``, ``ext.more``), grouped as webdataset does; None: no extension."""
    head, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_samples(
    f: BinaryIO, on_problem: ProblemHandler, wanted: Callable[[int], bool] = lambda ordinal: True
) -> Iterator[tuple[int, dict]]:
    """(ordinal, {"__key__": key, ext: bytes, ...}) for every wanted sample of one shard, in order.

    Each run of consecutive members with one key is a sample and takes the next
    ordinal, whether it is wanted, complete or not, so ordinals do not depend on
    ``wanted``. Payloads of unwanted samples are never read. The sample being
    built when a header is corrupt or the shard ends early may have lost a member:
    it is dropped and reported (``incomplete_sample``), as is a sample holding one
    extension twice (``duplicate_member``).
    """
    key: str | None = None  # of the sample being built
    ordinal = -1
    sample: dict | None = None  # None: not wanted, or dropped

    def want_member(name: str) -> bool:
        parts = split_name(name)
        return parts is not None and wanted(ordinal if parts[0] == key else ordinal + 1)

    for name, payload in iter_members(f, want_member, on_problem):
        if name == BROKEN:  # corrupt header or cut shard: the sample being built may have lost members
            if sample is not None:
                on_problem("incomplete_sample", f"sample {key!r} dropped: a member next to it is unreadable")
            sample = None
            continue
        parts = split_name(name)
        if parts is None:
            continue
        if parts[0] != key:
            if sample is not None:
                yield ordinal, sample
            key, ordinal = parts[0], ordinal + 1
            sample = {"__key__": key} if wanted(ordinal) else None
        if sample is None:
            continue
        if parts[1] in sample:
            on_problem("duplicate_member", f"sample {key!r} has two {parts[1]!r} members")
            sample = None
            continue
        sample[parts[1]] = payload
    if sample is not None:
        yield ordinal, sample


def read_samples(pattern: str, allow_shell: bool = False) -> Iterator[dict]:
    """Every raw sample of the shards, in order (evaluation, tests); any tar problem raises."""

    def fail(reason: str, message: str) -> None:
        raise ValueError(f"{reason}: {message}")

    for url in expand_shards(pattern, allow_shell):
        with open_shard(url) as f:
            for _, sample in iter_samples(f, fail):
                yield sample
