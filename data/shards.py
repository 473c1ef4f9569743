"""Writing shards: local sources -> webdataset tar shards of a target size, validated on the way.

``scripts/make_shards.py`` is the command line; the logic is here so tests and the
bundled-data builders use it too. Three input layouts, one per source kind:

* ``generation``: a folder of images + a captions JSONL (``{"image": "rel/path.jpg", "caption": "..."}``);
* ``conversation``: a LLaVA/InternVL JSON or JSONL (``{"id", "image": path or [paths],
  "conversations": [...]}``) with image paths relative to ``--image-root``;
* ``text``: a JSONL of ``{"text": ...}`` or a plain text file (documents separated by blank lines).

Each record is checked while it is converted (missing file, unreadable image,
empty caption, image over the pixel cap, images not matching the ``<image>``
markers, an empty id or one whose sample key another record already has, an image
path that leaves ``--image-root``, ...). A rejected record goes to the report file
(JSONL: line, id, reason, detail); totals are printed at the end. Images are
optionally resized (shorter side, never upscaled) and re-encoded. One process per
core does the decoding; the parent writes the shards in input order, so the output
is the same for any number of processes.

The output folder must be empty (or not exist): shards of an earlier run left there
would be read as part of this one. ``replace=True`` (``--replace``) first removes an
earlier run's shards, ``sizes.json`` and reports, and refuses a folder holding anything else.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from data.images import open_image
from data.sources import parse_conversation
from data.stream import BadSample
from mm.sequence import IMAGE_MARKER, ROLE_ASSISTANT

# data.images, data.sources, data.stream and mm.sequence (torch: seconds) are imported where records are converted,
# so that make_shards.py checks its arguments and output folder before any of that.

SIZES_FILE = "sizes.json"
LAYOUTS = ("generation", "conversation", "text")  # input layouts; generation:<head> kinds use generation's
OUTPUT_FILE = re.compile(r".+\.tar(\.tmp)?|.+-report\.jsonl|" + re.escape(SIZES_FILE))  # what make_shards writes


class ShardWriter:
    """Samples -> ``{prefix}-{n:06d}.tar`` shards of at most ``max_bytes`` (or ``max_count`` samples) each.

    Shards are written under a temporary name and renamed when complete, so a
    crash never leaves a half-written shard under a final name. ``close`` records
    each shard's sample count in ``sizes.json`` beside them (merged with the entries
    there whose shard file still exists: several writers may share a folder).
    Members get mtime 0 and no owner, so the same input gives the same bytes.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_bytes: int = 256 << 20, max_count: int = 0):
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.max_bytes, self.max_count = max_bytes, max_count
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._bytes = self._count = 0

    def _roll(self) -> None:
        self._finish()
        path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self.paths.append(path)
        self._tar = tarfile.open(path.with_suffix(".tar.tmp"), "w", format=tarfile.PAX_FORMAT)
        self._bytes = self._count = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.paths[-1]
        path.with_suffix(".tar.tmp").replace(path)
        self.sizes[path.name] = self._count
        self._tar = None

    def write(self, sample: dict[str, bytes | str]) -> None:
        key = sample["__key__"]
        members = {ext: (v.encode() if isinstance(v, str) else v) for ext, v in sample.items() if ext != "__key__"}
        size = sum(len(v) + 1024 for v in members.values())
        full = self._count and (
            self._bytes + size > self.max_bytes or (self.max_count and self._count >= self.max_count)
        )
        if self._tar is None or full:
            self._roll()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self._count += 1

    def close(self) -> list[Path]:
        self._finish()
        sizes_path = self.out_dir / SIZES_FILE
        sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
        sizes = {name: n for name, n in sizes.items() if (self.out_dir / name).is_file()}  # no stale entries
        sizes.update(self.sizes)
        sizes_path.write_text(json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
        return self.paths


def rebuild_if_stale(out_dir: Path, schema: str, what: str, build: Callable[[], object]) -> bool:
    """A bundled dataset's shards in ``out_dir``: rebuilt (old ``*.tar`` removed, then ``build()``) when the
    ``SCHEMA`` marker is missing or names another schema; True if built. ``build`` writes the marker last."""
    marker = out_dir / "SCHEMA"
    if marker.exists() and marker.read_text().strip() == schema:
        return False
    print(f"building {what} in {out_dir}", flush=True)
    for old in out_dir.glob("*.tar"):
        old.unlink()
    build()
    return True


# ---- conversion -------------------------------------------------------------------
@dataclass(frozen=True)
class ImageOptions:
    image_size: int = 0  # resize the shorter side to this (never up); 0 keeps the size
    max_pixels: int = 64_000_000  # larger images are rejected
    reencode: str = "jpg"  # "jpg" | "png" | "keep" (keep the file's bytes when no resize is needed)
    quality: int = 90


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line (or document) number in the input, for the report
    id: str
    kind: str
    images: tuple[str, ...] = ()  # absolute paths
    text: str = ""  # caption or document
    meta: str = ""  # JSON of the conversation record


class Reject(Exception):
    """Why a record is not written (it crosses processes: the args are what pickling keeps)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def encode_image(path: str, opts: ImageOptions) -> tuple[str, bytes]:
    """(extension, bytes) of one image after checks, resizing and re-encoding."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise Reject("missing_file", path) from None
    except OSError as e:
        raise Reject("unreadable_file", f"{path}: {e}") from None
    try:
        img = open_image(data, opts.max_pixels)
        img.load()
    except BadSample as e:
        raise Reject("image_over_pixel_cap" if e.reason == "decompression_bomb" else "unreadable_image",
                     f"{path}: {e.message}") from None  # fmt: skip
    except (OSError, SyntaxError, ValueError) as e:
        raise Reject("unreadable_image", f"{path}: {e!r}") from None
    src_ext = Path(path).suffix.lower().lstrip(".") or "jpg"
    short = min(img.size)
    resize = bool(opts.image_size) and short > opts.image_size
    if not resize and opts.reencode == "keep":
        return src_ext, data
    if resize:
        scale = opts.image_size / short
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    fmt = opts.reencode if opts.reencode != "keep" else ("png" if src_ext == "png" else "jpg")
    if fmt == "jpg":
        img = img.convert("L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": opts.quality} if fmt == "jpg" else {}))
    return fmt, buf.getvalue()


def sample_key(record_id: str) -> str:
    """The sample key a record id becomes (letters, digits, ``-`` and ``_``; anything else is ``_``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in record_id)


def convert(record: Record, opts: ImageOptions) -> dict | Reject:
    """One input record -> the members of one shard sample, or the reason it is rejected."""
    try:
        sample: dict[str, bytes | str] = {"__key__": sample_key(record.id)}
        if record.kind == "generation":
            if not record.text.strip():
                raise Reject("empty_caption", "caption is empty")
            ext, data = encode_image(record.images[0], opts)
            sample[ext], sample["txt"] = data, record.text.strip()
        elif record.kind == "conversation":
            meta = json.loads(record.meta)
            try:
                turns = parse_conversation(meta, len(record.images))
            except BadSample as e:
                raise Reject(e.reason, e.message) from None
            markers = sum(text.count(IMAGE_MARKER) for _, text in turns)
            if markers != len(record.images):
                raise Reject("image_count_mismatch", f"{markers} <image> markers for {len(record.images)} images")
            if any(not text.strip() for role, text in turns if role == ROLE_ASSISTANT):
                raise Reject("empty_answer", "an assistant turn is empty")
            convs = meta["conversations"]
            for i, path in enumerate(record.images):
                ext, data = encode_image(path, opts)
                sample[f"{i}.{ext}" if len(record.images) > 1 else ext] = data
            sample["json"] = json.dumps({"conversations": convs, "id": record.id})
        elif record.kind == "text":
            if not record.text.strip():
                raise Reject("empty_text", "document is empty")
            sample["txt"] = record.text
        else:
            raise ValueError(f"unknown kind {record.kind!r}")
        return sample
    except Reject as e:
        return e


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, object or None, raw line) of a JSONL file, or of a JSON array file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        for i, obj in enumerate(json.loads(text), 1):
            yield i, obj, ""
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line), line
        except json.JSONDecodeError:
            yield i, None, line


def _image_paths(value: object, root: Path, line: int) -> tuple[str, ...] | Reject:
    """A record's image path(s) under ``root``; a path that is not a string or that leaves ``root`` is rejected."""
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        return Reject("bad_image_field", f"line {line}: image paths must be non-empty strings, got {value!r:.80}")
    base = os.path.normpath(root)
    out = []
    for rel in paths:
        path = os.path.normpath(os.path.join(base, rel))  # lexical: '..' and absolute paths cannot leave root
        if os.path.commonpath([base, path]) != base:
            return Reject("image_outside_root", f"line {line}: {rel!r} is outside the image root {base}")
        out.append(path)
    return tuple(out)


def read_records(kind: str, input_path: str | Path, image_root: str | Path | None = None) -> Iterator[Record | Reject]:
    """Records of one input file (``Reject`` for lines that cannot be used: unparsable, an empty id, an id whose
    sample key an earlier record has, image paths outside ``image_root``). ``kind``: a layout of ``LAYOUTS``."""
    input_path = Path(input_path)
    root = Path(image_root) if image_root else input_path.parent
    if kind == "text" and input_path.suffix not in (".jsonl", ".json"):
        docs = [d for d in input_path.read_text(encoding="utf-8").split("\n\n") if d.strip()]  # blank: separators
        for i, doc in enumerate(docs, 1):
            yield Record(i, f"{input_path.stem}-{i:08d}", kind, text=doc)
        return
    keys: dict[str, int] = {}  # sample key -> line that has it
    for line, obj, raw in _read_jsonl(input_path):
        if not isinstance(obj, dict):
            yield Reject("bad_json", f"line {line}: {raw[:80]!r}")
            continue
        rid = obj.get("id", f"{input_path.stem}-{line:08d}")
        if rid is None or not str(rid).strip():  # its members would be named '.jpg': no reader takes them
            yield Reject("empty_id", f"line {line}: id {rid!r}")
            continue
        rid = str(rid)
        if sample_key(rid) in keys:
            yield Reject("duplicate_id", f"line {line}: id {rid!r} (sample key {sample_key(rid)!r}) as on line "
                                         f"{keys[sample_key(rid)]}")  # fmt: skip
            continue
        keys[sample_key(rid)] = line
        if kind == "text":
            yield Record(line, rid, kind, text=str(obj.get("text", "")))
            continue
        field = "image" if kind == "generation" or "image" in obj else "images"
        if kind == "generation" and "image" not in obj:
            yield Reject("missing_image_field", f"line {line}: no 'image'")
            continue
        images = _image_paths(obj.get(field, []), root, line)
        if isinstance(images, Reject):
            yield images
        elif kind == "generation":
            if len(images) != 1:
                yield Reject("bad_image_field", f"line {line}: a generation record has one image, not {len(images)}")
                continue
            yield Record(line, rid, kind, images, text=str(obj.get("caption", "")))
        else:
            yield Record(line, rid, kind, images, meta=json.dumps(obj))


def _convert_star(args: tuple[Record | Reject, ImageOptions]) -> tuple[Record | Reject, dict | Reject]:
    record, opts = args
    return record, record if isinstance(record, Reject) else convert(record, opts)


def prepare_out_dir(out_dir: str | Path, replace: bool = False, check_only: bool = False) -> None:
    """Refuse a non-empty output folder (an earlier run's shards would be read with this run's); with ``replace``,
    remove an earlier run's shards, sizes.json and reports first, and refuse a folder holding anything else.
    ``check_only``: raise what would be refused, remove nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file")
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries:
        return
    if not replace:
        raise FileExistsError(
            f"--out {out_dir} is not empty ({len(entries)} entries, e.g. {entries[0].name}); choose an empty folder, "
            "or pass --replace to replace the shards there"
        )
    foreign = [p.name for p in entries if not (p.is_file() and OUTPUT_FILE.fullmatch(p.name))]
    if foreign:
        raise FileExistsError(
            f"--out {out_dir} holds more than shards, sizes.json and reports ({foreign[:3]}): not replaced"
        )
    for p in [] if check_only else entries:
        p.unlink()


def make_shards(
    kind: str, input_path: str | Path, out_dir: str | Path, prefix: str = "shard", image_root: str | Path | None = None,
    max_bytes: int = 256 << 20, max_count: int = 0, opts: ImageOptions = ImageOptions(), processes: int = 0,
    report: str | Path | None = None, progress: bool = True, replace: bool = False,
) -> dict:  # fmt: skip
    """Convert one input into shards in an empty ``out_dir`` (``replace``: see :func:`prepare_out_dir`); returns
    the totals (also printed by the script). ``kind``: a source kind; ``generation:<head>`` reads as generation."""
    layout = kind.partition(":")[0]
    if layout not in LAYOUTS:
        raise ValueError(f"kind {kind!r}: make_shards writes {LAYOUTS} (and generation:<head>)")
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, replace)
    report_path = Path(report) if report else out_dir / f"{prefix}-report.jsonl"
    writer = ShardWriter(out_dir, prefix, max_bytes, max_count)
    rejected: Counter[str] = Counter()
    written = 0
    processes = processes or os.cpu_count() or 1
    jobs = ((r, opts) for r in read_records(layout, input_path, image_root))
    # spawn, not fork: forking a process that already runs threads (torch, tokenizers) can deadlock the children
    pool = multiprocessing.get_context("spawn").Pool(processes) if processes > 1 else None
    with report_path.open("w") as rep:
        results = pool.imap(_convert_star, jobs, chunksize=4) if pool else map(_convert_star, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, desc=f"{kind} -> {out_dir}", unit="sample")
        for record, result in results:
            if isinstance(result, Reject):
                rejected[result.reason] += 1
                where = {"line": record.line, "id": record.id} if isinstance(record, Record) else {}
                rep.write(json.dumps({**where, "reason": result.reason, "detail": result.detail}) + "\n")
                continue
            writer.write(result)
            written += 1
    if pool is not None:
        pool.close()
        pool.join()
    paths = writer.close()
    return {
        "kind": kind, "written": written, "rejected": sum(rejected.values()), "rejected_by_reason": dict(rejected),
        "shards": len(paths), "bytes": sum(p.stat().st_size for p in paths), "out_dir": str(out_dir),
        "report": str(report_path),
    }  # fmt: skip
