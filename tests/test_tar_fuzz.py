"""The shard reader under damage: seeded mutations of real shards never hang it, never make it raise, and cost
only the damaged samples and their neighbours, except for the damage that loses the rest of a shard (a cut).

The corpus (``fuzz_cases``) is shared with ``scripts/bench_tar.py``, which runs tarfile and webdataset on it too.
"""

from __future__ import annotations

import io
import random
import signal
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from data.tar import BLOCK, MAX_MEMBER_BYTES, _pax_records, _size, iter_members, iter_samples, split_name

CASE_TIMEOUT_S = 5  # a read that takes longer is a hang (each takes milliseconds)
FIELDS = {"mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12), "mtime": (136, 12),
          "chksum": (148, 8)}  # fmt: skip


def _value(kind: str, width: int) -> bytes:
    """What a damaged numeric field holds: 0, negative, huge, non-numeric (text and GNU base-256 forms)."""
    return {
        "zero": b"0" * (width - 1) + b"\0",
        "nul": bytes(width),
        "negative": b"-" + b"0" * (width - 3) + b"1\0",
        "negative256": b"\xff" * width,
        "huge": b"7" * (width - 1) + b"\0",
        "huge256": b"\x80\x7f" + b"\xff" * (width - 2),
        "nonnumeric": b"1x3 abc".rjust(width - 1, b"0") + b"\0",
        "underscore": b"1_0".rjust(width - 1, b"0") + b"\0",  # int("1_0", 8) == 8: must not be taken
        "prefixed": b"0o7".rjust(width - 1, b" ") + b"\0",  # int("0o7", 8) == 7: must not be taken
    }[kind]


# ---- real shards ---------------------------------------------------------------------------
def real_samples(n: int = 24) -> list[dict]:
    """sklearn digits as the bundled builder writes them, plus two skimage photo crops (multi-block payloads)."""
    from skimage import data as skdata
    from sklearn.datasets import load_digits

    from data.bundled.digits import digit_pixels, image_sample, png_bytes

    digits = load_digits()
    out = [image_sample(f"digit{i:05d}", png_bytes(digit_pixels(digits.images[i])), f"draw the digit {t}",
                        "what digit is this ?", str(t)) for i, t in enumerate(digits.target[:n].tolist())]  # fmt: skip
    for i, name in enumerate(["camera", "coins"]):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(getattr(skdata, name)())[:96, :96]).save(buf, format="PNG")
        out.insert(5 + 9 * i, {"__key__": f"photo{i}", "png": buf.getvalue(), "txt": f"a photo of {name}"})
    return out


def write_tar(samples: list[dict], fmt: str) -> bytes:
    """ustar: as ShardWriter writes; pax: long keys (pax path records) and explicit pax size records; gnu: L headers."""
    buf = io.BytesIO()
    tar_format = {"ustar": tarfile.PAX_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}[fmt]
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for s in samples:
            key = s["__key__"] if fmt == "ustar" else f"{'d' * 110}/{s['__key__']}"
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else value
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                if fmt == "pax":
                    info.pax_headers = {"size": f"{len(data):012d}"}
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class Span:
    key: str
    start: int  # its first header (extended headers included)
    end: int  # past its last padded payload
    sample: dict


def sample_spans(data: bytes) -> list[Span]:
    """The samples of an intact tar with their byte spans, from tarfile."""
    spans: list[Span] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            key, ext = split_name(m.name)
            end = m.offset_data + -(-m.size // BLOCK) * BLOCK
            payload = tar.extractfile(m).read()
            if spans and spans[-1].key == key:
                last = spans.pop()
                spans.append(Span(key, last.start, end, {**last.sample, ext: payload}))
            else:
                spans.append(Span(key, m.offset, end, {"__key__": key, ext: payload}))
    return spans


def headers(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, typeflag, size) of every header of an intact tar, extended headers included."""
    out, pos = [], 0
    while pos + BLOCK <= len(data) and data[pos : pos + BLOCK] != bytes(BLOCK):
        size = int(data[pos + 124 : pos + 136].split(b"\0")[0].strip() or b"0", 8)
        out.append((pos, data[pos + 156 : pos + 157], size))
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return out


# ---- the corpus ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    base: str  # ustar | pax | gnu
    what: str
    data: bytes
    damage: tuple[int, int]  # the byte range changed (a cut: from the cut to the end)
    cut: bool = False  # the rest of the shard is gone
    stream_loses_rest: bool = False  # a size past the end with a valid checksum: a stream cannot seek back


def _with_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def fuzz_cases(seed: int = 0, per_base: int = 110) -> Iterator[tuple[Case, list[Span]]]:
    """Seeded damage of three real shards: bit flips (anywhere and in headers), cuts, header fields set to 0 /
    negative / huge / non-numeric (with and without a matching checksum), bad pax records, bad GNU long names."""
    rng = random.Random(seed)
    samples = real_samples()
    for base in ("ustar", "pax", "gnu"):
        clean = write_tar(samples, base)
        spans, heads = sample_spans(clean), headers(clean)
        assert len(spans) == len(samples)
        for i in range(per_base):
            yield _mutate(rng, base, clean, heads, i % 6), spans


def _mutate(rng: random.Random, base: str, clean: bytes, heads: list, kind: int) -> Case:
    data = bytearray(clean)
    if kind == 0:  # a few bits anywhere
        pos = rng.randrange(len(data))
        for _ in range(rng.randint(1, 3)):
            data[min(pos + rng.randrange(8), len(data) - 1)] ^= 1 << rng.randrange(8)
        return Case(base, f"flip@{pos}", bytes(data), (pos, pos + 8))
    if kind == 1:  # a bit in a header
        at = rng.choice(heads)[0] + rng.randrange(BLOCK)
        data[at] ^= 1 << rng.randrange(8)
        return Case(base, f"header-flip@{at}", bytes(data), (at, at + 1))
    if kind == 2:  # cut short
        cut = rng.randrange(len(data))
        return Case(base, f"cut@{cut}", bytes(data[:cut]), (cut, len(clean)), cut=True)
    if kind in (3, 4):  # a numeric field of a header (extended headers too), checksum fixed or not
        at, flag, _ = rng.choice(heads)
        field = rng.choice(list(FIELDS))
        value = rng.choice(["zero", "nul", "negative", "negative256", "huge", "huge256", "nonnumeric", "underscore",
                            "prefixed"])  # fmt: skip
        off, width = FIELDS[field]
        block = bytearray(data[at : at + BLOCK])
        block[off : off + width] = _value(value, width)
        fixed = kind == 4 and field != "chksum"
        if fixed:
            _with_checksum(block)
        data[at : at + BLOCK] = block
        past_end = fixed and field == "size" and value in ("huge", "huge256")
        what = f"{field}={value}{' (checksum fixed)' if fixed else ''} in {flag!r} header @{at}"
        return Case(base, what, bytes(data), (at, at + BLOCK), stream_loses_rest=past_end)
    return _mutate_extended(rng, base, data, heads)


def _mutate_extended(rng: random.Random, base: str, data: bytearray, heads: list) -> Case:
    """Damage inside a pax record block (length or size value: 0, negative, huge, non-numeric) or a GNU long name."""
    extended = [(at, flag, size) for at, flag, size in heads if flag in (b"x", b"L")]
    if not extended:  # the ustar shard has none: flip a bit of a payload's first block instead
        at = rng.choice(heads)[0] + BLOCK + rng.randrange(BLOCK)
        data[at] ^= 1 << rng.randrange(8)
        return Case(base, f"payload-flip@{at}", bytes(data), (at, at + 1))
    at, flag, size = rng.choice(extended)
    lo, hi = at + BLOCK, at + BLOCK + size
    if flag == b"L":
        data[lo] = 0  # an empty long name
        return Case(base, f"empty GNU long name @{at}", bytes(data), (lo, hi))
    records = bytes(data[lo:hi])
    start = records.index(b" size=") if rng.random() < 0.5 else 0
    if start:  # the size value
        v0 = start + len(b" size=")
        width = records.index(b"\n", v0) - v0
        value = rng.choice(["0" * width, "-" + "1".rjust(width - 1, "0"), "9" * width, "abc".rjust(width, "0")])
        data[lo + v0 : lo + v0 + width] = value.encode()
        what = f"pax size={value}"
        past_end = value == "9" * width
    else:  # the first record's length
        width = records.index(b" ")
        value = rng.choice(["0" * width, "-" + "1".rjust(width - 1, "0"), "9" * width, "x" * width])
        data[lo : lo + width] = value.encode()
        what, past_end = f"pax record length {value}", False
    return Case(base, f"{what} @{at}", bytes(data), (lo, hi), stream_loses_rest=past_end)


# ---- running the reader -------------------------------------------------------------------------
class _Pipe(io.RawIOBase):
    """The bytes as a stream that cannot seek (what a ``pipe:`` shard is)."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self.inner.readinto(buf)


def as_stream(data: bytes, seekable: bool) -> io.BufferedIOBase:
    return io.BytesIO(data) if seekable else io.BufferedReader(_Pipe(data), 1 << 16)


@contextmanager
def deadline(seconds: float, what: str):
    def expire(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: {what}")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_case(case: Case, seekable: bool) -> tuple[list[dict], list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    with deadline(CASE_TIMEOUT_S, case.what):
        samples = [s for _, s in iter_samples(as_stream(case.data, seekable), lambda r, m: problems.append((r, m)))]
    return samples, problems


def affected(case: Case, spans: list[Span]) -> set[int]:
    """Samples the damage may cost: those it touches and the one on either side (a cut: everything after it)."""
    lo, hi = case.damage
    hit = [i for i, s in enumerate(spans) if s.start < hi and lo < s.end]
    if not hit:  # padding or end blocks: the neighbours
        before = [i for i, s in enumerate(spans) if s.end <= lo]
        hit = [before[-1]] if before else []
        hit += [i for i, s in enumerate(spans) if s.start >= hi][:1]
    out = set(hit) | {min(hit) - 1, max(hit) + 1} if hit else set()
    if case.cut:
        out |= set(range(min(hit, default=len(spans)) - 1, len(spans)))
    return {i for i in out if 0 <= i < len(spans)}


def check_case(case: Case, spans: list[Span], seekable: bool) -> tuple[int, int]:
    """Assert the contract for one damaged shard; returns (intact samples recovered, intact samples expected)."""
    samples, problems = read_case(case, seekable)
    index = {s.key: i for i, s in enumerate(spans)}
    costly = affected(case, spans)
    where = f"{case.base}/{case.what} ({'file' if seekable else 'stream'})"
    keys = [s["__key__"] for s in samples]
    inside = {i for i, s in enumerate(spans) if s.start < case.damage[1] and case.damage[0] < s.end}
    impostors = []  # samples under a key they do not belong to
    for key in dict.fromkeys(keys):
        group = [s for s in samples if s["__key__"] == key]
        if key not in index:
            impostors += group
        elif index[key] not in inside:  # away from the damage: the original, exactly, at most once
            original = spans[index[key]].sample
            assert group.count(original) <= 1, f"{where}: {key!r} read {group.count(original)} times"
            impostors += [s for s in group if s != original]
        # the damaged sample itself may come back garbled or split (tar has no data checksum)
    # A flip inside a GNU long name or a pax path record renames a member (those names are data, with no checksum):
    # it may come back under any key, once. In the ustar layout every name is in a checksummed header.
    allowed = 1 if inside and not case.cut and case.base != "ustar" else 0
    assert len(impostors) <= allowed, f"{where}: samples under keys they do not belong to: {impostors}"
    missing = set(index) - set(keys)
    assert not missing or problems, f"{where}: {len(missing)} sample(s) lost without a report"
    assert all(reason in REASONS for reason, _ in problems), f"{where}: unknown reasons {problems}"
    expected = [i for i in range(len(spans)) if i not in costly]
    got = [i for i in expected if spans[i].key in keys]
    if not (case.stream_loses_rest and not seekable):  # every intact sample away from the damage is read
        lost = [spans[i].key for i in expected if spans[i].key not in keys]
        assert not lost, f"{where}: intact samples lost: {lost[:5]} (problems: {problems[:4]})"
    return len(got), len(expected)


REASONS = {"corrupt_member", "truncated_shard", "incomplete_sample", "duplicate_member", "oversized_member"}


# ---- tests --------------------------------------------------------------------------------------------
def test_fuzzed_real_shards_never_hang_never_raise_and_keep_every_intact_sample():
    t0 = time.monotonic()
    seen: dict[str, int] = {}
    for case, spans in fuzz_cases(seed=0):
        for seekable in (True, False):
            check_case(case, spans, seekable)
        kind = case.what.split("@")[0].split("=")[0].split(" ")[0]
        seen[kind] = seen.get(kind, 0) + 1
    # every kind of damage was exercised, on every layout
    assert {"flip", "header-flip", "cut", "size", "pax", "empty"} <= set(seen), seen
    assert time.monotonic() - t0 < 30


def test_intact_shards_read_exactly_with_no_problem():
    samples = real_samples()
    for fmt in ("ustar", "pax", "gnu"):
        data = write_tar(samples, fmt)
        for seekable in (True, False):
            got, problems = read_case(Case(fmt, "intact", data, (len(data), len(data))), seekable)
            assert problems == [] and got == [s.sample for s in sample_spans(data)]


def test_header_numbers_are_parsed_strictly():
    assert _size(b"00000001750\0") == 1000 and _size(bytes(12)) == 0 and _size(b"\x80" + bytes(10) + b"\x01") == 1
    for bad in (b"-0000000001\0", b"\xff" * 12, b"000000001_0\0", b"        0o7\0", b"0000 000012\0", b"12x\0"):
        with pytest.raises(ValueError):
            _size(bad)


@pytest.mark.parametrize(
    "records",
    [b"0 size=5\n", b"-12 size=5\n", b"999 size=5\n", b"x size=5\n", b"12 size=5\n", b"6 =5\n", b"10 path\n"],
)
def test_malformed_pax_records_raise_value_error_at_once(records):
    with deadline(2, repr(records)), pytest.raises(ValueError):
        _pax_records(records)


def test_pax_records_of_every_field_are_read():
    assert _pax_records(b"10 size=5\n14 path=a/b.c\n\0\0") == {"size": "5", "path": "a/b.c"}


@pytest.mark.parametrize("claim", [10 << 30, MAX_MEMBER_BYTES - 1])
def test_a_header_claiming_gigabytes_allocates_only_what_exists(claim):
    """A member whose size field claims 10 GB (or just under the cap) on a stream: nothing near that is allocated."""
    import tracemalloc

    good = write_tar([{"__key__": "a", "txt": "fine"}], "ustar")
    block = bytearray(BLOCK)
    block[:9] = b"big.0.bin"
    block[100:108] = b"0000444\0"
    block[124:136] = b"\x80" + claim.to_bytes(11, "big")
    block[156:157], block[257:263] = b"0", b"ustar\0"
    _with_checksum(block)
    at, _, size = headers(good)[-1]
    data = good[: at + BLOCK + -(-size // BLOCK) * BLOCK] + bytes(block) + b"x" * 5000  # no end blocks: cut short
    problems: list[tuple[str, str]] = []
    tracemalloc.start()
    with deadline(10, "big member"):
        keys = [m for m, _ in iter_members(as_stream(data, False), lambda n: True, lambda r, m: problems.append(r))]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert "a.txt" in keys and problems and problems[0] in ("oversized_member", "truncated_shard")
    with deadline(10, "big member, file"):  # on a file the size is checked against what is left
        problems.clear()
        samples = list(iter_samples(as_stream(data, True), lambda r, m: problems.append(r)))
    assert [s["__key__"] for _, s in samples] == ["a"] and problems[0] == "truncated_shard"
