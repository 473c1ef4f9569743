#!/usr/bin/env bash
# One GPU proof command: every measurement the fast-packed-training work needs from one short GPU run,
# printed as ONE JSON object on stdout (progress on stderr). Sized for one H100 in under 8 minutes: each
# step runs under its own time limit (the limits add up to 470 s; estimates: no GPU was at hand to time
# them), and a step that fails or runs out of time is reported as such while the others still run. Triton
# caches its compiled kernels on disk, so the steps after pytest reuse what the gpu tests compiled.
#
#   bash scripts/gpu_check.sh               # on a GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke   # the same steps, tiny, on a CPU (the default test suite runs it)
#
# Steps:
#   pytest_gpu     pytest -m gpu: fused ops compiled (fp32 and bf16), the fused model == torch, flex/flash
#                  == sdpa, the frequency tokenizer on CUDA (on a CPU: all collected and skipped, with reasons)
#   bench_train    scripts/bench_train.py at the JanusFlow-1.3B shapes (configs/janusflow_1.3b.yaml, random
#                  weights, bundled digits packed into rows of 4096, bf16 autocast): MFU per attention backend
#                  (sdpa, flex, flash_attention_2 when installed) with fused kernels, then with torch kernels
#   bench_mod      scripts/bench_mod.py: dense vs p-MoD decoder (JanusFlow-width layers, fused kernels, bf16)
#   bench_gen      scripts/bench_gen.py: NFIG vs raster vs flow heads, trained briefly, sampling on the GPU
#   bench_kernels  scripts/bench_kernels.py: reference vs fused per op (16k tokens, hidden 4096, vocabulary
#                  102,400: the LM head + loss peak memory), packed attention's backward per token
# Set PYTHON to choose the interpreter (default: .venv/bin/python, else python).
set -u
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --cpu-smoke) MODE=cpu-smoke ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$(date +%s)

# step NAME LIMIT_S CMD...: stdout -> $OUT/NAME.out, stderr -> $OUT/NAME.err, "rc seconds" -> $OUT/NAME.rc
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "gpu_check: $name (limit ${limit} s): $*" >&2
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
  rc=$?
  echo "$rc $(($(date +%s) - t0))" >"$OUT/$name.rc"
  echo "gpu_check: $name rc=$rc in $(($(date +%s) - t0)) s" >&2
}

if [ "$MODE" = gpu ]; then
  step pytest_gpu 90 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" tests
  step bench_train 190 "$PY" scripts/bench_train.py --config configs/janusflow_1.3b.yaml --digits \
    --allow-random-frozen --backends sdpa,flex,flash_attention_2 --kernels fused,torch --steps 6 --block 2 \
    --warmup 3 --batches 2 --json-out "$OUT/bench_train.json" engine.precision=bf16_autocast data.num_workers=2
  step bench_mod 45 "$PY" scripts/bench_mod.py --device cuda --dtype bfloat16 --kernels fused --hidden 2048 \
    --layers 24 --heads 16 --mlp 5632 --rows 2 --samples-per-row 4 --image-tokens 576 --text-tokens 64 --repeats 5
  step bench_gen 75 "$PY" scripts/bench_gen.py --device cuda --steps 100 --per-prompt 5 --batch 50 \
    --time-rounds 3 --out "$OUT/bench_gen"
  step bench_kernels 70 "$PY" scripts/bench_kernels.py --repeats 10
else
  step pytest_gpu 120 "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" tests
  step bench_train 120 "$PY" scripts/bench_train.py --config configs/tiny.yaml --backends sdpa,flex,flash_attention_2 \
    --kernels fused,torch --steps 2 --block 1 --warmup 1 --batches 1 --json-out "$OUT/bench_train.json" \
    train.threads=1 data.num_workers=0
  step bench_mod 60 "$PY" scripts/bench_mod.py --device cpu --kernels fused --hidden 64 --layers 3 --heads 4 \
    --mlp 128 --rows 1 --samples-per-row 2 --image-tokens 32 --text-tokens 8 --text-before 2 --repeats 1 --threads 1
  step bench_gen 120 "$PY" scripts/bench_gen.py --device cpu --heads flow --steps 3 --per-prompt 1 --batch 10 \
    --time-rounds 1 --out "$OUT/bench_gen"
  step bench_kernels 120 "$PY" scripts/bench_kernels.py --cpu-smoke
fi

"$PY" - "$OUT" "$MODE" "$(($(date +%s) - START))" <<'EOF'
"""Merge the steps' outputs into one JSON object, with the issue's goals beside the figures."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, mode, total = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
STEPS = ("pytest_gpu", "bench_train", "bench_mod", "bench_gen", "bench_kernels")


def last_json(text: str):
    """The JSON object a bench script printed: the whole stdout, or the last object in it. Only an object counts:
    a line of an indented object ("0.0153") parses as a number, and stray output before the JSON (a library's
    notice on stdout) must not make that number the result."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    for candidate in (text, *("\n".join(lines[i:]) for i in reversed(starts)), *reversed(lines)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def pytest_result() -> dict | None:
    xml = out / "pytest.xml"
    if not xml.is_file():
        return None
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = {"passed": [], "failed": [], "skipped": []}
    reasons = {}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            cases["failed"].append(name)
        elif case.find("skipped") is not None:
            cases["skipped"].append(name)
            reasons[name] = case.find("skipped").get("message", "")
        else:
            cases["passed"].append(name)
    return {k: len(v) for k, v in cases.items()} | {"failed_tests": cases["failed"], "skip_reasons": reasons}


steps = {}
for name in STEPS:
    rc_file = out / f"{name}.rc"
    if not rc_file.is_file():
        steps[name] = {"ran": False}
        continue
    rc, seconds = (int(x) for x in rc_file.read_text().split())
    text = (out / f"{name}.out").read_text(errors="replace")
    result = pytest_result() if name == "pytest_gpu" else last_json(text)
    partial = out / f"{name}.json"
    if result is None and partial.is_file():  # cut short: the settings it finished
        result = json.loads(partial.read_text()) | {"partial": True}
    entry = {"rc": rc, "seconds": seconds, "timed_out": rc in (124, 137), "result": result}
    if rc != 0:
        entry["stderr_tail"] = (out / f"{name}.err").read_text(errors="replace")[-1500:]
    steps[name] = entry


def summary() -> dict:
    s = {}
    train = (steps.get("bench_train") or {}).get("result") or {}
    s["mfu"] = {f"{r['backend']}/{r['kernels']}": r.get("mfu", r.get("skipped") or r.get("error"))
                for r in train.get("results", [])}
    s["goal_mfu"] = 0.40
    kern = (steps.get("bench_kernels") or {}).get("result") or {}
    s["fused_speedup"] = {k: v.get("speedup") for k, v in kern.get("ops", {}).items()}
    s["goal_fused_speedup"] = 1.5
    s["linear_ce_peak_ratio"] = kern.get("linear_ce_peak_ratio")
    s["goal_linear_ce_peak_ratio"] = kern.get("goal_linear_ce_peak_ratio")
    s["attention_flatness"] = (kern.get("attention") or {}).get("flatness")
    s["goal_attention_flatness"] = (kern.get("attention") or {}).get("goal_flatness")
    mod = (steps.get("bench_mod") or {}).get("result") or {}
    s["mod_train_wall_ratio"], s["mod_flops_ratio"] = mod.get("train_wall_ratio"), mod.get("flops_ratio")
    return s


ok = all(e.get("rc") == 0 for e in steps.values())
report = {"mode": mode, "ok": ok, "total_s": total, "budget_s": 480, "steps": steps, "summary": summary()}
print(json.dumps(report))
sys.exit(0 if ok else 1)
EOF
