"""Datasets of a task, from local folders only (nothing is downloaded).

As lmms-eval reads ``dataset_path`` + ``dataset_kwargs``:

* ``dataset_kwargs: {load_from_disk: true}``: ``datasets.load_from_disk(dataset_path)``.
* ``dataset_path: json | parquet | csv`` with ``dataset_kwargs: {data_files: ...}``: the
  ``datasets`` packaged builder on local files (JSONL is ``json``). A VLMEvalKit TSV is
  ``csv`` with ``sep: "\\t"`` and ``converters: !function mm.eval.sources.VLMEVALKIT_TEXT``
  (text columns stay verbatim: pandas would read option "6" as 6.0 in a column with
  empty cells); its base64 ``image`` column is decoded by
  :func:`decode_base64_image`, and rows whose ``image`` names another row's ``index``
  (VLMEvalKit's de-duplication) are resolved by :func:`resolve_tsv_image_refs`.

Relative paths are taken relative to the YAML file's folder when that exists there,
else to the repository root (where ``data/bench`` lives).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from PIL import Image

from mm.eval.taskfile import FunctionRef, TaskConfig, TaskFileError
from mm.schema import REPO_ROOT

PACKAGED_BUILDERS = ("json", "parquet", "csv")
# pandas converters that keep VLMEvalKit's text columns as written (empty cells still read as missing)
VLMEVALKIT_TEXT = {c: str for c in ["question", "hint", "answer", "category", "l2-category", "image", *"ABCDEFGHI"]}


def resolve_data_path(path: str, yaml_path: Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    near = yaml_path.parent / p
    return near if near.exists() else REPO_ROOT / p


def _resolve_files(files, yaml_path: Path):
    if isinstance(files, str):
        return str(resolve_data_path(files, yaml_path))
    if isinstance(files, list):
        return [_resolve_files(f, yaml_path) for f in files]
    if isinstance(files, dict):
        return {k: _resolve_files(v, yaml_path) for k, v in files.items()}
    raise TaskFileError(f"{yaml_path}: data_files must be a path, a list or a mapping, got {files!r}")


def load_task_docs(cfg: TaskConfig):
    """The ``test_split`` of the task's dataset as a ``datasets.Dataset`` (``process_docs`` applied)."""
    import datasets

    kwargs = {k: v.resolve() if isinstance(v, FunctionRef) else v for k, v in (cfg.dataset_kwargs or {}).items()}
    if kwargs.pop("load_from_disk", False):
        path = resolve_data_path(cfg.dataset_path, cfg.yaml_path)
        if not path.exists():
            raise FileNotFoundError(f"task {cfg.task}: dataset not found at {path} (dataset_path={cfg.dataset_path!r})")
        ds = datasets.load_from_disk(str(path))
    elif cfg.dataset_path in PACKAGED_BUILDERS:
        if "data_files" not in kwargs:
            raise TaskFileError(f"{cfg.yaml_path}: dataset_path={cfg.dataset_path} needs dataset_kwargs.data_files")
        kwargs["data_files"] = _resolve_files(kwargs["data_files"], cfg.yaml_path)
        ds = datasets.load_dataset(cfg.dataset_path, **kwargs)
    else:
        raise TaskFileError(
            f"{cfg.yaml_path}: dataset_path={cfg.dataset_path!r} is neither load_from_disk nor one of "
            f"{PACKAGED_BUILDERS} (hub datasets are not read: everything is local)"
        )
    if isinstance(ds, datasets.DatasetDict):
        if cfg.test_split not in ds:
            raise KeyError(f"task {cfg.task}: split {cfg.test_split!r} not in {list(ds)}")
        ds = ds[cfg.test_split]
    if cfg.process_docs is not None:
        ds = cfg.process_docs(ds)
    return ds


def decode_base64_image(data: str) -> Image.Image:
    """A VLMEvalKit ``image`` cell (base64 PNG/JPEG) -> PIL image."""
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


def encode_base64_image(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def is_missing(value) -> bool:
    """Empty VLMEvalKit cells arrive as None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def resolve_tsv_image_refs(dataset):
    """Rows whose ``image`` is another row's ``index`` get that row's image (VLMEvalKit stores repeats once)."""
    by_index = {str(i): img for i, img in zip(dataset["index"], dataset["image"]) if not _is_ref(img)}

    def fix(row: dict) -> dict:
        if _is_ref(row["image"]):
            if row["image"] not in by_index:
                raise KeyError(f"TSV row {row['index']}: image refers to missing index {row['image']}")
            row["image"] = by_index[row["image"]]
        return row

    return dataset.map(fix) if any(_is_ref(x) for x in dataset["image"]) else dataset


def _is_ref(value) -> bool:
    return isinstance(value, str) and len(value) <= 64 and value.isdigit()


def write_vlmevalkit_tsv(rows: list[dict], path: Path) -> None:
    """Rows with PIL ``image`` and option columns -> a VLMEvalKit-style TSV (base64 images)."""
    import pandas as pd

    out = [{**r, "image": encode_base64_image(r["image"])} for r in rows]
    pd.DataFrame(out).to_csv(path, sep="\t", index=False)
