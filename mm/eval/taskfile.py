"""Task YAML in lmms-eval's shape: one file per task, read the way lmms-eval reads it.

Keys (lmms-eval's names): ``task``, ``dataset_path``, ``dataset_kwargs``, ``test_split``,
``output_type`` (``generate_until``; ours adds ``generate_image`` for text-to-image),
``doc_to_visual``, ``doc_to_text``, ``doc_to_target``, ``doc_to_choice``,
``process_docs``, ``process_results``, ``metric_list`` (``metric``, ``aggregation``,
``higher_is_better``), ``generation_kwargs``, ``lmms_eval_specific_kwargs``, ``metadata``.

* ``include: other_yaml`` (or a list) loads those files first (relative to this file's
  folder) and lets this file override their keys, as lmms-eval does; an include loop is
  a one-line error naming the chain.
* ``!function utils.name`` names ``name`` in ``utils.py`` next to the YAML file that
  holds the tag, or in a subfolder (``!function sub.helpers.name``), never outside that
  folder; else in an importable module (``!function mm.eval.sources.X``). The module is
  imported, so its top-level code runs, on first use.
* String templates (``doc_to_text: "Q: {{ question }}"``) render in jinja2's sandbox:
  attribute tricks that reach Python internals fail instead of running.
* A file with ``group`` and a ``task`` list is a group of tasks. Task and group names
  become file and folder names under the output folder: letters, digits, ``_ - .``,
  not starting with a dot.
* Files without ``task``/``group`` (e.g. ``_default_template_yaml``) are only includes.

**A task folder is code.** Its Python files run with the evaluator's rights, and
``!function`` may name any importable module: trust a task folder as you would trust a
Python package you install (``mm/eval/tasks/README.md``).

Unknown keys fail with the file and key named; keys lmms-eval knows that our harness
does not use are accepted and listed in ``IGNORED_KEYS``.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm.schema import REPO_ROOT

OUTPUT_TYPES = ("generate_until", "generate_image")
IGNORED_KEYS = {
    "tag", "dataset_name", "description", "target_delimiter", "fewshot_delimiter", "num_fewshot", "fewshot_config",
    "model_specific_generation_kwargs", "model_specific_prompt_kwargs", "repeats", "filter_list",
    "should_decontaminate", "doc_to_decontamination_query", "validation_split", "training_split", "fewshot_split",
    "output_type_kwargs", "process_results_use_image",
}  # fmt: skip
TASK_KEYS = {
    "task", "dataset_path", "dataset_kwargs", "test_split", "output_type", "doc_to_visual", "doc_to_text",
    "doc_to_target", "doc_to_choice", "process_docs", "process_results", "metric_list", "generation_kwargs",
    "lmms_eval_specific_kwargs", "metadata",
}  # fmt: skip
DEFAULT_TASK_DIR = REPO_ROOT / "mm" / "eval" / "tasks"
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used as file and folder names under --out


class TaskFileError(ValueError):
    """A task YAML is malformed: the message names the file and the key."""


_MODULES: dict[Path, Any] = {}


@dataclass(frozen=True)
class FunctionRef:
    """``!function module.name`` resolved against the folder of the YAML file that holds it."""

    folder: Path
    spec: str

    def resolve(self) -> Callable:
        """The named attribute: from ``<module>.py`` inside the YAML's folder, else from an importable module."""
        module_name, _, name = self.spec.rpartition(".")
        if not all(part.isidentifier() for part in (*module_name.split("."), name)):
            raise TaskFileError(
                f"!function {self.spec!r} (in {self.folder}): not module.name (dotted Python identifiers, no leading "
                "dot, no path)"
            )
        path = (self.folder / f"{module_name.replace('.', '/')}.py").resolve()
        if path.is_file() and not path.is_relative_to(self.folder.resolve()):  # a symlink out of the folder
            raise TaskFileError(f"!function {self.spec}: {path} is outside the task folder {self.folder}")
        if not path.is_file():
            try:  # lmms-eval's fallback: an absolute import (e.g. mm.eval.sources.VLMEVALKIT_TEXT)
                return getattr(importlib.import_module(module_name), name)
            except (ImportError, AttributeError):
                raise TaskFileError(
                    f"!function {self.spec}: neither {path} nor an importable {module_name!r}"
                ) from None
        if path not in _MODULES:
            spec = importlib.util.spec_from_file_location(f"mm_eval_task_{module_name}_{abs(hash(path))}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _MODULES[path] = module
        fn = getattr(_MODULES[path], name, None)
        if fn is None:
            raise TaskFileError(f"!function {self.spec}: {path} has no {name!r}")
        return fn

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)


def _loader_for(folder: Path) -> type[yaml.SafeLoader]:
    """A SafeLoader whose ``!function`` tags resolve relative to ``folder``."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: FunctionRef(folder, loader.construct_scalar(node)))
    return Loader


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """One task/group/template file with its ``include`` chain merged (later files override earlier ones)."""
    path = Path(path).resolve()
    if path in _chain:
        raise TaskFileError(f"include loop: {' -> '.join(str(p) for p in (*_chain, path))}")
    if not path.is_file():
        raise TaskFileError(f"task file not found: {path}" + (f" (included by {_chain[-1]})" if _chain else ""))
    try:
        raw = yaml.load(path.read_text(), Loader=_loader_for(path.parent)) or {}
    except yaml.YAMLError as e:
        raise TaskFileError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise TaskFileError(f"{path}: expected a mapping at the top level")
    includes = raw.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        merged.update(load_yaml(inc_path, (*_chain, path)))
    merged.update(raw)
    merged["__file__"] = str(path)
    return merged


@dataclass
class TaskConfig:
    task: str
    yaml_path: Path
    dataset_path: str = ""
    dataset_kwargs: dict = field(default_factory=dict)
    test_split: str = "test"
    output_type: str = "generate_until"
    doc_to_visual: Callable | None = None
    doc_to_text: Callable | str | None = None
    doc_to_target: Callable | str | None = None
    doc_to_choice: Callable | str | list | None = None
    process_docs: Callable | None = None
    process_results: Callable | None = None
    metric_list: list[dict] = field(default_factory=list)
    generation_kwargs: dict = field(default_factory=dict)
    lmms_eval_specific_kwargs: dict = field(default_factory=dict)
    metadata: Any = None

    def prompt_kwargs(self, model_name: str = "unified_mm") -> dict:
        """lmms-eval's choice: the model's own entry if present, else ``default``."""
        kw = self.lmms_eval_specific_kwargs or {}
        return dict(kw.get(model_name, kw.get("default", {})))


@dataclass
class GroupConfig:
    group: str
    tasks: list[str]
    yaml_path: Path


def check_name(name: object, path: Path, what: str = "task") -> str:
    """A task or group name that is safe as a file name under the output folder (``samples_<task>.jsonl``)."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise TaskFileError(
            f"{path}: {what} name {name!r} is not allowed: letters, digits, '_', '-', '.', not starting with '.' "
            "(it names files under the output folder)"
        )
    return name


def parse_task(cfg: dict) -> TaskConfig | GroupConfig:
    path = Path(cfg.pop("__file__"))
    if "group" in cfg and isinstance(cfg.get("task"), list):
        return GroupConfig(check_name(cfg["group"], path, "group"), [str(t) for t in cfg["task"]], path)
    check_name(cfg.get("task"), path)
    unknown = set(cfg) - TASK_KEYS - IGNORED_KEYS - {"group"}
    if unknown:
        raise TaskFileError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(TASK_KEYS)}")
    if cfg.get("output_type", "generate_until") not in OUTPUT_TYPES:
        raise TaskFileError(f"{path}: output_type={cfg['output_type']!r}; supported: {OUTPUT_TYPES}")
    for m in cfg.get("metric_list", []):
        if not isinstance(m, dict) or "metric" not in m:
            raise TaskFileError(f"{path}: every metric_list entry needs a 'metric' key, got {m!r}")
    known = {k: v for k, v in cfg.items() if k in TASK_KEYS}
    return TaskConfig(yaml_path=path, **known)


def discover(dirs: list[str | Path] | None = None) -> dict[str, Path]:
    """task or group name -> its YAML file, over every ``*.yaml`` under ``dirs`` (default: the bundled tasks)."""
    found: dict[str, Path] = {}
    for d in dirs or [DEFAULT_TASK_DIR]:
        d = Path(d)
        if not d.is_dir():
            raise TaskFileError(f"task directory not found: {d}")
        for p in sorted(d.rglob("*.yaml")):
            # only the name is needed here: read without resolving includes or functions
            head = yaml.load(p.read_text(), Loader=_loader_for(p.parent)) or {}
            name = head.get("group") if isinstance(head.get("task"), list) else head.get("task")
            if name is None and "include" in head:
                name = load_yaml(p).get("task")
            if name is not None:
                check_name(name, p, "group" if isinstance(head.get("task"), list) else "task")
                if name in found and found[name] != p:
                    raise TaskFileError(f"task {name!r} defined twice: {found[name]} and {p}")
                found[name] = p
    return found


def load_tasks(names: list[str], dirs: list[str | Path] | None = None) -> list[TaskConfig]:
    """Task configs for ``names`` (groups expanded, order kept); an unknown name lists the known ones."""
    index = discover(dirs)
    out: list[TaskConfig] = []
    for name in names:
        if name not in index:
            raise KeyError(f"unknown task {name!r}; known: {sorted(index)}")
        cfg = parse_task(load_yaml(index[name]))
        if isinstance(cfg, GroupConfig):
            out += [t for t in load_tasks(cfg.tasks, dirs) if t.task not in {o.task for o in out}]
        elif cfg.task not in {o.task for o in out}:
            out.append(cfg)
    return out


def call_doc_fn(fn: Callable | str | None, doc: dict, prompt_kwargs: dict | None = None) -> Any:
    """lmms-eval's rules: a callable (given the prompt kwargs when it takes two arguments), a column, or a template."""
    if fn is None:
        return None
    if isinstance(fn, str):
        if fn in doc:
            return doc[fn]
        return render_template(fn, doc)
    if isinstance(fn, list):
        return fn
    target = fn.resolve() if isinstance(fn, FunctionRef) else fn
    if len(inspect.signature(target).parameters) >= 2 and prompt_kwargs is not None:
        return target(doc, prompt_kwargs)
    return target(doc)


@functools.lru_cache(maxsize=256)
def _template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment().from_string(source)


def render_template(source: str, doc: dict) -> str:
    """A ``doc_to_*`` string template, rendered in jinja2's sandbox (a task file's text must not run code)."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        return _template(source).render(**doc)
    except SecurityError as e:
        raise TaskFileError(f"template {source[:120]!r} refused by the sandbox: {e}") from None
    except TemplateError as e:
        raise TaskFileError(f"template {source[:120]!r}: {type(e).__name__}: {e}") from None
