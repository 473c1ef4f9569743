"""Our shard reader vs tarfile's stream mode vs webdataset's tar iterators, side by side; prints one JSON.

    python scripts/bench_tar.py [--seeds 3] [--repeats 5] [--photo-mb 200]

Damage: the seeded corpus of tests/test_tar_fuzz.py (real digits shards in three tar
layouts, with bit flips, cuts, header fields set to 0 / negative / huge / non-numeric,
damaged pax records and GNU long names). For each reader and each damaged shard:
whether it raised (for webdataset: called its handler, which by default re-raises),
hung (no result in ``--timeout`` s) or ran out of memory, how many of the *intact*
samples (those whose bytes the damage did not touch) it returned exactly, and how many
samples it returned that are not an original sample (garbled, or silently missing a
member). Each reader runs in its own forked process (peak RSS reported).

Throughput: every reader reads the same intact shards from the page cache, best of
``--repeats``: the digits (many ~100-byte members) and skimage photos (~100 KB PNGs).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.bundled.digits import build_digit_shards  # noqa: E402
from data.shards import ShardWriter  # noqa: E402
from data.stream import read_samples  # noqa: E402
from data.tar import iter_samples, split_name  # noqa: E402
from tests.test_tar_fuzz import Case, as_stream, deadline, fuzz_cases  # noqa: E402

Reader = Callable[[io.BufferedIOBase], tuple[list[dict], list[str]]]  # stream -> (samples, errors seen)


def ours(f) -> tuple[list[dict], list[str]]:
    problems: list[str] = []
    return [s for _, s in iter_samples(f, lambda r, m: problems.append(r))], problems


def _group(members) -> list[dict]:
    """(name, data) -> samples, as webdataset groups them (consecutive keys)."""
    out: list[dict] = []
    for name, data in members:
        parts = split_name(name)
        if parts is None:
            continue
        if not out or out[-1]["__key__"] != parts[0]:
            out.append({"__key__": parts[0]})
        out[-1][parts[1]] = data
    return out


def tarfile_stream(f, ignore_zeros: bool = False) -> tuple[list[dict], list[str]]:
    members, errors = [], []
    try:
        with tarfile.open(fileobj=f, mode="r|", ignore_zeros=ignore_zeros) as tar:
            for info in tar:
                if info.isreg():
                    members.append((info.name, tar.extractfile(info).read()))
                tar.members = []  # stream mode keeps every TarInfo otherwise
    except Exception as e:  # noqa: BLE001 - what it raises is the measurement
        errors.append(type(e).__name__)
    return _group(members), errors


def webdataset_samples(f) -> tuple[list[dict], list[str]]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    errors: list[str] = []

    def handler(exn: Exception) -> bool:  # warn_and_continue, counted: the default handler re-raises instead
        errors.append(type(exn).__name__)
        return True

    files = tar_file_expander([{"url": "case", "stream": f}], handler=handler)
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in group_by_keys(files, handler=handler)]
    return samples, errors


READERS: dict[str, tuple[Reader, bool]] = {  # name -> (reader, reads a seekable file)
    "ours (file)": (ours, True),
    "ours (stream)": (ours, False),
    "tarfile r|": (tarfile_stream, False),
    "tarfile r| ignore_zeros": (lambda f: tarfile_stream(f, True), False),
    "webdataset tarfile_to_samples": (webdataset_samples, False),
}


# ---- damage ---------------------------------------------------------------------------------
def _score(case: Case, spans, samples: list[dict]) -> tuple[int, int, int, int]:
    """(intact samples, intact returned exactly, returned samples missing members, other returned non-originals).

    Intact: the damage did not touch its bytes. Missing members: a sample returned with a strict subset of its
    members, which a consumer cannot tell from a complete one. Tar has no data checksum, so a sample whose own
    payload bytes were flipped comes back garbled from every reader (the last count).
    """
    lo, hi = case.damage
    originals = {s.key: s.sample for s in spans}
    intact = {s.key for s in spans if not (s.start < hi and lo < s.end)}
    exact = {s["__key__"] for s in samples if s["__key__"] in intact and s == originals[s["__key__"]]}
    wrong = [s for s in samples if originals.get(s["__key__"]) != s]
    short = [s for s in wrong if s["__key__"] in originals and set(s) < set(originals[s["__key__"]])]
    return len(intact), len(exact), len(short), len(wrong) - len(short)


def _fuzz_child(name: str, cases: list, timeout: float, conn) -> None:
    import tracemalloc

    reader, seekable = READERS[name]
    totals = dict(cases=0, raised=0, hung=0, memory_error=0, intact=0, recovered=0, lost_silently=0,
                  missing_members=0, garbled=0)  # fmt: skip
    tracemalloc.start()
    for case, spans in cases:
        totals["cases"] += 1
        try:
            with deadline(timeout, case.what):
                samples, errors = reader(as_stream(case.data, seekable))
        except TimeoutError:
            totals["hung"] += 1
            continue
        except MemoryError:
            totals["memory_error"] += 1
            continue
        except Exception:  # noqa: BLE001 - ours must not raise: counted, not hidden
            totals["raised"] += 1
            continue
        intact, exact, short, garbled = _score(case, spans, samples)
        totals["raised"] += bool(errors) and not name.startswith("ours")  # ours reports problems, never raises
        totals["intact"] += intact
        totals["recovered"] += exact
        totals["missing_members"] += short
        totals["garbled"] += garbled
        totals["lost_silently"] += exact < intact and not errors  # intact samples gone, nothing said
    totals["peak_python_alloc_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    conn.send(totals)


def _in_child(target, *args) -> dict:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(3600) else {"error": "no result"}
    proc.join()
    return result


# ---- throughput -------------------------------------------------------------------------------
def intact_shards(folder: Path, photo_mb: float) -> dict[str, Path]:
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    build_digit_shards(folder / "digits")
    digits = list(read_samples(f"{folder}/digits/train-{{000000..000003}}.tar"))
    w = ShardWriter(folder, "digits")
    for s in digits:
        w.write(s)
    w.close()
    photos = []
    for name in [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "coins",
        "hubble_deep_field",
        "immunohistochemistry",
    ]:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(getattr(skdata, name)())).save(buf, format="PNG")
        photos.append((name, buf.getvalue()))
    w, total, i = ShardWriter(folder, "photos"), 0, 0
    while total < photo_mb * 2**20:
        name, png = photos[i % len(photos)]
        w.write({"__key__": f"{name}{i:05d}", "png": png, "txt": f"a photo: {name}"})
        total, i = total + len(png), i + 1
    w.close()
    return {"digits": folder / "digits-000000.tar", "photos": folder / "photos-000000.tar"}


def _count(name: str, path: Path) -> int:
    """Samples of one intact shard file, each payload read and dropped (no reader keeps a list: same memory work)."""
    if name == "webdataset tarfile_to_samples":
        from webdataset.tariterators import tarfile_samples

        return sum(1 for _ in tarfile_samples([{"url": str(path)}]))
    with open(path, "rb", buffering=1 << 20) as f:
        if name == "tarfile r|":
            n, last = 0, None
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isreg():
                        tar.extractfile(info).read()
                        parts = split_name(info.name)
                        if parts and parts[0] != last:
                            n, last = n + 1, parts[0]
                    tar.members = []
            return n
        wanted = (lambda o: o % 100 == 0) if "1 in 100" in name else (lambda o: True)
        return sum(1 for _ in iter_samples(f, lambda r, m: None, wanted))


def throughput(shards: dict[str, Path], repeats: int) -> dict:
    """Best of ``repeats`` per reader, the readers interleaved within each repeat (same cache and memory state)."""
    names = ["ours (file)", "ours, 1 in 100 samples wanted (a resume re-read)", "tarfile r|",
             "webdataset tarfile_to_samples"]  # fmt: skip
    out: dict = {}
    for shard, path in shards.items():
        size_mb = path.stat().st_size / 2**20
        path.read_bytes()  # into the page cache
        best, counts = dict.fromkeys(names, float("inf")), {}
        for _ in range(repeats):
            for name in names:
                t0 = time.perf_counter()
                counts[name] = _count(name, path)
                best[name] = min(best[name], time.perf_counter() - t0)
        out[shard] = {"shard_mb": round(size_mb, 1)} | {
            name: {
                "samples": counts[name],
                "seconds": round(best[name], 4),
                "mb_per_s": round(size_mb / best[name]),
                "samples_per_s": round(counts[name] / best[name]),
            }  # fmt: skip
            for name in names
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="fuzz corpus seeds (330 damaged shards each)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds before a read counts as hung")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--photo-mb", type=float, default=200.0, help="size of the intact photo shard")
    args = ap.parse_args()
    if args.seeds < 1 or args.repeats < 1 or args.timeout <= 0 or args.photo_mb <= 0:
        ap.error("--seeds, --repeats, --timeout and --photo-mb must be positive")
    cases = [c for seed in range(args.seeds) for c in fuzz_cases(seed)]
    fuzz = {name: _in_child(_fuzz_child, name, cases, args.timeout) for name in READERS}
    with tempfile.TemporaryDirectory() as tmp:
        speed = throughput(intact_shards(Path(tmp), args.photo_mb), args.repeats)
    import webdataset

    print(json.dumps({
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "webdataset": webdataset.__version__},
        "fuzz": {"damaged_shards": len(cases), "seeds": args.seeds, "timeout_s": args.timeout, "readers": fuzz},
        "throughput": speed,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
