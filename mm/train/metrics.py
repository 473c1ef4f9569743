"""Where the logged metrics go (rank 0): the console, ``metrics.jsonl``, TensorBoard, and a loss-curve PNG.

Sinks are chosen by ``train.metrics`` from :data:`SINKS`. A resumed run first drops logged steps
after the checkpoint it resumed from, so no step is logged twice (TensorBoard: ``purge_step``).
"""

from __future__ import annotations

import json
from pathlib import Path

from mm.schema import ConfigError


def format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


LEGACY_LOSSES = ("text", "flow", "repa")  # records written before they named their losses


def loss_names(rec: dict) -> list[str]:
    """The losses a record holds: the total, then text and each image head's (``loss_names``)."""
    return ["loss", *rec.get("loss_names", [k for k in LEGACY_LOSSES if k in rec])]


class ConsoleSink:
    """One line per log step; the throughput fields appear when the record has them (the model trainer)."""

    def __init__(self, run_dir: Path, resume_step: int, max_steps: int):
        self.max_steps = max_steps

    def record(self, rec: dict) -> None:
        parts = [f"step {rec['step']}/{self.max_steps}"]
        parts.append(" ".join(f"{k} {_num(rec.get(k), '.4f')}" for k in loss_names(rec)))
        if "grad_norm" in rec:
            parts.append(f"gnorm {_num(rec['grad_norm'], '.3f')}")
        parts.append(f"lr {rec['lr']:.2e}")
        if "tokens_per_s_per_device" in rec:
            mfu = f" (MFU {rec['mfu']:.1%})" if "mfu" in rec else ""
            tflops = f"{rec['tflops_per_device']:.3f} TFLOP/s{mfu}"
            parts.append(f"{rec['tokens_per_s_per_device']:.0f} tok/s/device {tflops}")
            parts.append(f"data wait {rec['data_wait']:.0%}")
        if "peak_mem_gb" in rec:
            parts.append(f"mem {rec['peak_mem_gb']:.2f} GB")
        skipped = sum(rec.get("skipped", {}).values())
        if skipped:
            parts.append(f"skipped samples {skipped}")
        if rec.get("nonfinite_steps"):
            parts.append(f"non-finite steps {rec['nonfinite_steps']}")
        parts += [f"{k} {rec[k]}" for k in rec.get("extra_console", [])]
        if "eta_s" in rec:
            parts.append(f"eta {format_seconds(rec['eta_s'])}")
        print(" | ".join(parts), flush=True)

    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink:
    def __init__(self, run_dir: Path, resume_step: int, max_steps: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # keep steps <= the resumed step (0 on a fresh start)
            keep = [r for r in read_records(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def record(self, rec: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, run_dir: Path, resume_step: int, max_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def record(self, rec: dict) -> None:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k if "/" in k else f"train/{k}", v, rec["step"])
        for reason, n in rec["skipped"].items():
            self.writer.add_scalar(f"skipped/{reason}", n, rec["step"])
        self.writer.flush()

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


SINKS = {"console": ConsoleSink, "jsonl": JsonlSink, "tensorboard": TensorBoardSink}


def check_sinks(sinks: list[str]) -> None:
    unknown = sorted(set(sinks) - set(SINKS))
    if unknown:
        raise ConfigError(f"train.metrics: unknown sinks {unknown}; known: {sorted(SINKS)}")


class MetricsLogger:
    """Fans records out to the configured sinks; only rank 0 builds one."""

    def __init__(self, run_dir: Path, sinks: list[str], resume_step: int, max_steps: int):
        check_sinks(sinks)
        self.run_dir = run_dir
        self.sinks = [SINKS[s](run_dir, resume_step, max_steps) for s in sinks]

    def record(self, rec: dict) -> None:
        for sink in self.sinks:
            sink.record(rec)

    def scalar(self, name: str, value: float, step: int) -> None:
        """A per-step value (e.g. the data-wait share) for the sinks that keep every step."""
        for sink in self.sinks:
            sink.scalar(name, value, step)

    def plot(self) -> None:
        if (self.run_dir / "metrics.jsonl").exists():
            plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    """One panel per loss (the total, text, each image head's) over steps; windows without a task are gaps."""
    recs = read_records(metrics_path)
    if not recs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in loss_names(recs[-1]) if any(r.get(k) is not None for r in recs)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in recs if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(out)


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a partial last line (a crash mid-write) is dropped, not fatal."""
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return out
