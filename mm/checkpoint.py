"""Checkpoints on disk: written by the trainer, read by resume, eval, export and the lmms-eval adapter.

Layout of ``<run>/checkpoints/step_00001000/``:

* ``model.safetensors``: the trainable weights in fp32 (ZeRO's master copy, consolidated) and the
  buffers. Frozen pretrained modules are not copied: ``trainer.json`` names them (``referenced``) and
  :func:`load_model_weights` rebuilds them from the config's local paths (or ``train.init_from``).
* ``ema.safetensors``: the EMA of the trainable weights (fp32), when ``train.ema_decay > 0``.
* the engine's own state: ``optimizer.pt`` (DDP) or ``deepspeed/`` (DeepSpeed's ZeRO files).
* ``rng_rank<r>.pt``: each rank's torch RNG state.
* ``config.yaml`` and ``trainer.json`` (step, world size, every rank's data-loader position and skip
  counts, counters, the checkpoint ``format``, and ``files``: the size and sha256 of every other file),
  written last.

Every rank writes (and fsyncs) its files into ``.tmp_step_*``; after a barrier the ranks hash the files
between them, rank 0 writes ``trainer.json``, fsyncs it and the directory, renames the directory into
place, fsyncs the parent, then points ``latest`` at it (written beside, fsynced, renamed) and prunes to
the newest K. A job killed at any moment leaves either the new complete checkpoint or the previous one.

Reading: ``latest`` names the checkpoint to use; :func:`find_checkpoint` verifies it (sizes, then
sha256 against ``trainer.json``) and, when it does not verify, says which one it skipped and why and
falls back to the newest older one that does. Everything is read with ``weights_only=True`` or as
safetensors: no checkpoint can run code. A directory of DeepSpeed's own files (``*_model_states.pt``
and ``*_optim_states.pt``, no ``trainer.json``) is read with ``weights_only=True`` and the allow-list
of :func:`deepspeed_safe_types`, and its fp32 master weights are consolidated here
(:func:`load_deepspeed_weights`), never by DeepSpeed's ``zero_to_fp32`` (which unpickles anything).
Checkpoints of format 1 (written before image heads owned their parts) load with their weight names
mapped (``mm.model.legacy``); checkpoints written before checksums are checked for truncation only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mm.config import load_config
from mm.model.legacy import legacy_key
from mm.model.unified import build_model
from mm.schema import resolve_path

META = "trainer.json"
LATEST = "latest"
WEIGHT_FILES = ("model.safetensors", "ema.safetensors", "config.yaml")  # what eval and export read


class CheckpointError(Exception):
    """A checkpoint that cannot be used (missing, damaged, refused): the message is one line naming what would work."""


class RunExistsError(CheckpointError, FileExistsError):
    """A fresh start asked for in a run directory that already has checkpoints."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


# ---- files: the usual mode, durable writes, checksums ----------------------------------------------------


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_file_mode(path: Path) -> None:
    """The mode ``open()`` would give a new file (0666 less the umask): safetensors writes 0600 whatever the umask,
    which leaves weights unreadable to the rest of a team sharing a cluster folder."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """A rename or a new name is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, text: str) -> None:
    """Write beside ``path``, fsync, rename over it, fsync the directory: readers see the old or the new text."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    set_file_mode(path)
    fsync_file(path)


def load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=str(device))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def staged_files(directory: Path) -> list[str]:
    """Every file under ``directory`` but ``trainer.json``, as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != META)


def digest_files(directory: Path, rank: int = 0, world: int = 1) -> dict[str, dict]:
    """``{relative path: {bytes, sha256}}`` of this rank's share of the files (every ``world``-th one): the ranks
    hash a checkpoint between them. Each file is fsynced too (a no-op for the rank that already did)."""
    out = {}
    for name in staged_files(directory)[rank::world]:
        path = directory / name
        fsync_file(path)
        out[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


# ---- writing a checkpoint -------------------------------------------------------------------------------


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f".tmp_step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", path.name)
    return int(m.group(1)) if m else -1


def commit_checkpoint(run_dir: Path, step: int, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank has written into :func:`staging_dir` and ``meta["files"]`` holds their checksums:
    meta last, fsync, rename, fsync, point ``latest``, prune."""
    root = checkpoint_root(run_dir)
    tmp, final = staging_dir(run_dir, step), root / f"step_{step:08d}"
    (tmp / META).write_text(json.dumps(meta, indent=1))
    fsync_file(tmp / META)
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [tmp]:
        fsync_dir(d)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_durable(root / LATEST, final.name)
    older = [p for p in complete_checkpoints(run_dir) if checkpoint_step(p) < step]
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp_step_*"):  # left by a job killed while writing; nothing else writes now
        shutil.rmtree(stale, ignore_errors=True)
    return final


# ---- verifying and finding ------------------------------------------------------------------------------


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META).read_text())


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file's header says where its last tensor ends: a shorter (or longer) file is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} has {size} bytes, less than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name}: header of {n} bytes in a file of {size} (truncated)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name}: unreadable safetensors header"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} has {size} bytes, its header describes {8 + n + end} (truncated or damaged)"
    return None


def _structure_problem(ckpt: Path, names: Iterable[str]) -> str | None:
    """Checkpoints written before checksums: the cheap checks that catch a truncated file."""
    if not (ckpt / "model.safetensors").is_file():
        return "model.safetensors missing"
    for name in names:
        path = ckpt / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
            if problem:
                return problem
        elif zipfile.is_zipfile(path) is False and name.endswith(".pt"):
            return f"{name} is not a complete torch file (truncated?)"
    return None


def verify_checkpoint(ckpt: Path, files: Iterable[str] | None = None, rank: int = 0, world: int = 1) -> str | None:
    """None when the checkpoint is intact, else why not (one line). ``files``: only these (default every file);
    sizes are checked by every rank, the sha256 of every ``world``-th file by rank ``rank``."""
    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError) as e:
        return f"{META} unreadable ({type(e).__name__})"
    record = meta.get("files")
    if not isinstance(record, dict):  # written before checksums
        return _structure_problem(ckpt, files if files is not None else staged_files(ckpt))
    if "model.safetensors" not in record:
        return f"{META} records no model.safetensors"
    names = sorted(record) if files is None else [f for f in files if f in record]
    for name in names:
        path = ckpt / name
        if not path.is_file():
            return f"{name} missing"
        size, want = path.stat().st_size, record[name]["bytes"]
        if size != want:
            return f"{name} has {size} bytes, {META} recorded {want} ({'truncated' if size < want else 'changed'})"
    for name in names[rank::world]:
        if sha256_file(ckpt / name) != record[name]["sha256"]:
            return f"{name}: sha256 differs from the one {META} recorded (damaged or changed after it was written)"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step directories (with ``trainer.json``), oldest first."""
    root = checkpoint_root(run_dir)
    return sorted((p for p in root.glob("step_*") if (p / META).is_file()), key=checkpoint_step)


def resume_order(run_dir: Path) -> tuple[list[Path], list[str]]:
    """(checkpoints to try, notes): the one ``latest`` names, then older complete ones, newest first.

    ``latest`` is the truth: a complete checkpoint newer than it was never made current (a job killed between
    the rename and the pointer, or a run resumed from an earlier checkpoint) and is not used."""
    root = checkpoint_root(run_dir)
    complete, notes = complete_checkpoints(run_dir), []
    first = None
    if (root / LATEST).is_file():
        name = (root / LATEST).read_text().strip()
        if re.fullmatch(r"step_\d+", name) and (root / name / META).is_file():
            first = root / name
        else:
            notes.append(f"checkpoint: {root / LATEST} names {name!r}, not a complete checkpoint; using older ones")
    elif complete:
        notes.append(f"checkpoint: {root} has no {LATEST!r} pointer; using the newest complete checkpoint")
    if first is None:
        return complete[::-1], notes
    newer = [p.name for p in complete if checkpoint_step(p) > checkpoint_step(first)]
    if newer:
        notes.append(f"checkpoint: ignoring {newer}: newer than {LATEST!r} ({first.name}), never made current")
    return [first] + [p for p in complete[::-1] if checkpoint_step(p) < checkpoint_step(first)], notes


def _say(msg: str) -> None:
    print(msg, flush=True)


def find_checkpoint(
    run_dir: Path,
    which: str = "latest",
    verify: Callable[[Path], str | None] | None = None,
    say: Callable[[str], None] = _say,
) -> Path | None:
    """The checkpoint to use: ``auto`` (what ``latest`` names, else None: a fresh start), ``latest`` (the same, but
    absent is an error), or a path (a step directory, used as is; a run directory: its ``latest``).

    ``verify`` (default: the files eval and export read) says why a checkpoint is unusable; such a checkpoint is
    skipped with one line saying so, and the next older one is tried. A named step directory is not replaced."""
    verify = verify or (lambda c: verify_checkpoint(c, WEIGHT_FILES))
    if which not in ("auto", "latest"):
        path = Path(which)
        if (path / META).is_file():
            problem = verify(path)
            if problem:
                raise CheckpointError(f"checkpoint {path} is damaged: {problem}; name another step directory, or "
                                      "its run directory to take the newest one that verifies")  # fmt: skip
            return path
        if not checkpoint_root(path).is_dir():
            raise CheckpointError(f"{path} is neither a checkpoint (no {META}) nor a run directory (no checkpoints/)")
        run_dir, which = path, "latest"
    order, notes = resume_order(run_dir)
    for note in notes:
        say(note)
    for ckpt in order:
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        say(f"checkpoint: skipped {ckpt.name}: {problem}" + ("; trying the previous one" if ckpt != order[-1] else ""))
    if order:
        raise CheckpointError(
            f"no checkpoint of {run_dir} verifies ({len(order)} skipped, reasons above): name an intact step "
            "directory, or start the run over (train.py --overwrite)"
        )
    if which == "auto":
        return None
    raise CheckpointError(f"no checkpoint in {checkpoint_root(run_dir)}: train first, or resume with --resume auto")


# ---- DeepSpeed's own files, read without arbitrary pickle ------------------------------------------------


def deepspeed_safe_types() -> list[type]:
    """The DeepSpeed types its checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_deepspeed_file(path: Path) -> dict:
    """One DeepSpeed ``.pt`` file with ``weights_only=True`` and :func:`deepspeed_safe_types`; anything else in
    it (a crafted pickle) is refused in one line, never run."""
    try:
        safe = deepspeed_safe_types()
    except ImportError as e:
        raise CheckpointError(f"{path}: reading DeepSpeed files needs deepspeed installed ({e})") from None
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        why = f"it holds {found.group(1)}, not an allowed type" if found else str(e).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"{path}: refused ({why}): DeepSpeed files are read only with weights_only=True and the types "
            "mm.checkpoint.deepspeed_safe_types() allows; use a checkpoint our trainer wrote (model.safetensors)"
        ) from None


def deepspeed_tag_dir(path: Path) -> Path | None:
    """The folder holding DeepSpeed's ``*_model_states.pt``: ``path`` itself, the tag its ``latest`` names, or its
    only sub-folder with such files; None if ``path`` is no DeepSpeed checkpoint."""
    if not path.is_dir():
        return None
    if list(path.glob("*_model_states.pt")):
        return path
    if (path / LATEST).is_file():
        tag = path / (path / LATEST).read_text().strip()
        return tag if tag.parent == path and list(tag.glob("*_model_states.pt")) else None
    tags = [p for p in path.iterdir() if p.is_dir() and list(p.glob("*_model_states.pt"))]
    return tags[0] if len(tags) == 1 else None


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def load_deepspeed_weights(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(fp32 weights and buffers, ZeRO stage) of a DeepSpeed checkpoint folder, consolidated from every rank's
    partition of the optimizer's fp32 master copy. Frozen parameters are not in such files."""
    tag = deepspeed_tag_dir(path)
    if tag is None:
        raise CheckpointError(f"{path}: no DeepSpeed *_model_states.pt here (nor in the tag its 'latest' names)")
    model_files = sorted(tag.glob("*_model_states.pt"), key=_natural)
    optim_files = sorted(tag.glob("*_optim_states.pt"), key=_natural)
    if not optim_files:
        raise CheckpointError(f"{tag}: no *_optim_states.pt: the fp32 weights of a ZeRO checkpoint are in them")
    other = [p.name for p in tag.glob("*.pt") if "expert" in p.name or re.search(r"mp_rank_(?!00_)\d+", p.name)]
    if other:
        raise CheckpointError(f"{tag}: {other[0]}: tensor/pipeline-parallel and expert layouts are not consolidated "
                              "here; only ZeRO-1/2/3 data parallelism is")  # fmt: skip
    model_state = load_deepspeed_file(model_files[0])
    parts = [load_deepspeed_file(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(parts[0]["zero_stage"])
    world = parts[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(parts):
        raise CheckpointError(f"{tag}: {len(parts)} *_optim_states.pt files for a world of {world} (some rank's "
                              "file is missing or stale)")  # fmt: skip
    names = set(model_state["buffer_names"])
    out = {k: v.float() if v.is_floating_point() else v for k, v in model_state["module"].items() if k in names}
    shapes = model_state["param_shapes"]
    if stage <= 2:  # frozen parameters, when saved, are whole in rank 0's file
        out |= {k: v.float() for k, v in (model_state.get("frozen_param_fragments") or {}).items()}
        out |= _merge_zero12(parts, shapes, world, parts[0].get("param_alignment_paddings"))
    else:
        out |= _merge_zero3(parts, shapes, world)
    for alias, target in dict(model_state.get("shared_params") or {}).items():
        if target in out:
            out[alias] = out[target]
    return out, stage


def _merge_zero12(parts: list[dict], shapes: list[dict], world: int, paddings: list | None) -> dict:
    """ZeRO-1/2: each parameter group is one flat vector cut into ``world`` equal slices, one per rank's file."""
    out = {}
    for g, group in enumerate(shapes):
        flat = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(tuple(shape)).clone()
            offset += n + (paddings[g][i] if paddings else 0)
        align = 2 * world  # the group is padded to a multiple of 2 x world
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise CheckpointError(f"ZeRO group {g}: parameters cover {offset} of {flat.numel()} elements")
    return out


def _merge_zero3(parts: list[dict], shapes: list[dict], world: int) -> dict:
    """ZeRO-3: every parameter is cut into ``world`` slices of ceil(n / world) (the last padded); each rank's file
    holds its slice of each parameter, one after the other."""
    flats = [torch.cat(list(p["fp32_flat_groups"])) for p in parts]
    out, offset = {}, 0
    for name, shape in ((k, v) for group in shapes for k, v in group.items()):
        n = math.prod(shape)
        part = math.ceil(n / world)
        out[name] = torch.cat([f[offset : offset + part] for f in flats])[:n].view(tuple(shape)).clone()
        offset += part
    if offset != flats[0].numel():
        raise CheckpointError(f"ZeRO-3 partitions: parameters cover {offset} of {flats[0].numel()} elements per rank")
    return out


# ---- reading a checkpoint's weights ---------------------------------------------------------------------


def load_model_weights(checkpoint_dir: str | Path, ema: bool = False, verify: bool = True) -> dict[str, torch.Tensor]:
    """Full weights (every key of the model's state dict) of a checkpoint written by any engine.

    ``ema=True`` takes the EMA of the trainable weights where the run kept one (else the weights).
    Frozen modules the checkpoint only references are rebuilt from the saved config's local paths.
    A run directory means its ``latest`` checkpoint; the files read are verified first (``verify``).
    """
    ckpt = Path(checkpoint_dir)
    if not (ckpt / META).is_file():
        ckpt = find_checkpoint(ckpt, "latest")
    elif verify:
        find_checkpoint(ckpt, str(ckpt))
    meta = read_meta(ckpt)
    weights = load_tensors(ckpt / "model.safetensors")
    if ema and (ckpt / "ema.safetensors").is_file():
        weights.update(load_tensors(ckpt / "ema.safetensors"))
    rename = legacy_key if meta.get("format", 1) < 2 else (lambda k: k)
    weights = {rename(k): v for k, v in weights.items()}
    if meta.get("referenced"):  # frozen pretrained modules: from their paths (or init_from), as the run built them
        cfg = load_config(ckpt / "config.yaml", quiet=True)
        model = build_model(cfg.model)
        if cfg.train.init_from:
            load_init(model, cfg.train.init_from)
        full = model.state_dict()
        weights = {k: weights.get(k, v) for k, v in full.items()}
    for alias, target in meta.get("aliases", {}).items():  # tied weights are saved once
        weights[rename(alias)] = weights[rename(target)]
    missing = sorted({rename(k) for k in meta.get("state_keys", weights)} - set(weights))
    if missing:
        raise CheckpointError(f"{ckpt} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return weights


def is_release(path: Path) -> bool:
    """A release folder (``scripts/export_release.py``, ``scripts/convert.py``): config.json + safetensors."""
    return (path / "config.json").is_file() and any(
        (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
    )


def release_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a release folder (one file, or shards named by the index)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return load_tensors(path / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_tensors(path / shard))
    return out


# Parts a model may add to the one it starts from; they begin at their own initialisation: p-MoD's routers
# (zero: every token kept, as dense) and REPA's projector (a release holds none). A model that adds them
# to a converted release or a dense run starts from the rest.
FRESH_PARTS = ("mod_routers.", "heads.*.repa_proj.")


def _fresh(key: str) -> bool:
    parts = key.split(".")
    return key.startswith("mod_routers.") or (len(parts) > 3 and parts[0] == "heads" and parts[2] == "repa_proj")


def load_init(model: torch.nn.Module, path: str | Path) -> None:
    """``train.init_from``: start from the weights of a checkpoint (or a run's newest one), or of a release
    folder (a converted published model: its ``model.yaml`` is the model section that fits). Every weight must
    be there except :data:`FRESH_PARTS` (said when missing); nothing may be left over."""
    path = resolve_path(path)
    if not (path / META).is_file() and is_release(path):
        state = release_weights(path)
    else:
        state = load_model_weights(path)
    result = model.load_state_dict(state, strict=False)
    fresh = [k for k in result.missing_keys if _fresh(k)]
    missing = [k for k in result.missing_keys if not _fresh(k)]
    if missing or result.unexpected_keys:
        extra = result.unexpected_keys
        raise KeyError(f"train.init_from={path}: weights do not match the model: missing {missing[:5]} "
                       f"({len(missing)}), unexpected {extra[:5]} ({len(extra)})")  # fmt: skip
    if fresh:
        parts = sorted({".".join(k.split(".")[:3]) if k.startswith("heads.") else k.split(".")[0] for k in fresh})
        print(f"train.init_from={path}: no weights for {', '.join(parts)} ({len(fresh)} tensors): they start from "
              "their initialisation", flush=True)  # fmt: skip
