#!/usr/bin/env python3
"""The device check: one call on a bare GPU machine, with its own ``python3`` and nothing downloaded.

    python3 scripts/gpu_check.py --out "$OUT"           # there, with .whl/ carried (scripts/gpu_wheels.sh)
    python3 scripts/gpu_check.py --device cpu --out DIR  # the rehearsal here: tiny shape, CPU, same steps

Steps, each in a child process with its own time limit (the whole check stays inside ``--budget``):

1. ``environment``: Python, torch, CUDA device, transformers, nvidia-smi.
2. ``wheels``: the carried wheels into ``--site`` (``pip install --no-index --no-deps --target``); every
   later step runs with ``PYTHONPATH=<site>:<this repo>`` (no venv, no console script, no install of ours).
3. ``imports``: lisa_agent and the carried packages import, from where they should; transformers is one
   lisa_agent accepts.
4. ``tests``: tests/test_cuda.py (every test ``gpu``-marked) and tests/test_transformers_versions.py; on the
   CPU also tests/test_acceleration.py (not slow). On CUDA a test skipped for want of CUDA is a failure.
5. ``bench_<shape>_bf16`` and ``bench_<shape>_4bit``: ``lisa-agent bench --compare`` on random weights of
   the LISA-7B shape, one round each, 4-bit with torchao (``--device cpu``: ``bench_tiny_fp32`` and
   ``bench_tiny_8bit``, torchao int8 in place of 4-bit, which needs CUDA).
6. ``bench_reasoner``: ``lisa-agent bench --compare`` on random weights of VisionReasoner-7B's shape (Qwen2.5-VL-7B
   with SAM 2.1 Hiera-L) in bf16: prefill, decoding per token with the static cache and compiled decoding step
   against eager (``--device cpu``: the tiny reasoner shape, fp32).

``<out>/gpu_check.json`` is rewritten after every step (a run killed half-way still leaves what it did);
beside it each step's log and the bench reports. Exits 1 when any step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the child running now (killed with its group when this check is told to stop)
RUNNING: list[subprocess.Popen] = []

ENVIRONMENT = r"""
import json, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
try:
    import torch
    info.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    memory_gb=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
except Exception as exc:
    info["torch_error"] = repr(exc)
for name in ("transformers", "tokenizers", "huggingface_hub", "numpy", "torchvision"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = "missing: " + type(exc).__name__
print(json.dumps(info))
"""

IMPORTS = r"""
import json, sys
import lisa_agent, segment_anything, torchao, pycocotools, xxhash, pytest, transformers
from lisa_agent.engine.build import check_transformers
check_transformers()
site = sys.argv[1]
where = {m.__name__: m.__file__ for m in (lisa_agent, segment_anything, torchao, pycocotools, xxhash, pytest)}
carried = [n for n in ("segment_anything", "torchao", "pycocotools", "xxhash", "pytest") if not where[n].startswith(site)]
print(json.dumps({"transformers": transformers.__version__, "torchao": torchao.__version__,
                  "pytest": pytest.__version__, "where": where, "not_from_site": carried}))
sys.exit(1 if carried else 0)
"""


class Report:
    """``gpu_check.json``: what ran, how long, whether it passed; rewritten whole after every step."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.path = out / "gpu_check.json"
        self.data: dict[str, Any] = {"device": args.device, "shape": args.shape, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "finished": False, "ok": None, "steps": []}
        self.write()

    def add(self, name: str, ok: bool, seconds: float, **detail: Any) -> None:
        self.data["steps"].append({"name": name, "ok": ok, "seconds": round(seconds, 1), **detail})
        self.write()
        print(f"[gpu_check] {name}: {'ok' if ok else 'FAILED'} ({seconds:.1f} s)", flush=True)

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def run(cmd: list[str], *, env: dict[str, str], timeout: float, stdout: Path | None = None,
        log: Path | None = None) -> tuple[int | None, float, str]:
    """``cmd`` in its own process group, killed whole after ``timeout`` s. Its output goes to ``stdout``
    (a file; stderr then to ``log``), else all of it to ``log``, else is kept. Returns (exit code, or None
    when killed; seconds; the last lines of its log or output)."""
    start = time.monotonic()
    files = []
    if stdout is not None:
        files.append(open(stdout, "w"))  # noqa: SIM115 - closed below
        out_to: Any = files[-1]
        err_to: Any = subprocess.STDOUT
        if log is not None:
            files.append(open(log, "w"))  # noqa: SIM115
            err_to = files[-1]
    elif log is not None:
        files.append(open(log, "w"))  # noqa: SIM115
        out_to, err_to = files[-1], subprocess.STDOUT
    else:
        out_to, err_to = subprocess.PIPE, subprocess.STDOUT
    # its own process group (killed whole at the time limit) in this session: whoever ends this check's
    # session (the device tool at its limit) ends the children too
    group: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out_to, stderr=err_to, text=True, **group)
    except OSError as exc:  # no such program (nvidia-smi on a machine without a GPU)
        for f in files:
            f.close()
        return 127, time.monotonic() - start, f"{cmd[0]}: {exc}"
    RUNNING.append(proc)
    try:
        text, _ = proc.communicate(timeout=max(1.0, timeout))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        code = None
    finally:
        RUNNING.remove(proc)
        for f in files:
            f.close()
    if log is not None:
        text = log.read_text(errors="replace")
    elif stdout is not None:
        text = stdout.read_text(errors="replace")
    tail = "\n".join((text or "").strip().splitlines()[-15:])
    return code, time.monotonic() - start, tail


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and skip reasons of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    skips, failed = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for child in case:
            if child.tag == "skipped":
                skips.append(f"{name}: {child.get('message', '')}")
            elif child.tag in ("failure", "error"):
                failed.append(f"{name}: {(child.get('message') or '')[:300]}")
    return {**counts, "skips": skips, "failed": failed}


def bench_summary(path: Path) -> dict[str, Any]:
    """The headline numbers of a ``bench --compare --json`` report: medians as configured, ratios, memory."""
    result = json.loads(path.read_text())
    first = result["runs"][0]["report"]
    return {"device": first["device"], "settings": first["settings"],
            "median_ms": {mode: m["median_ms"] for mode, m in first["modes"].items()},
            "ratios": result["ratios"], "peak_memory_mb": first["peak_memory_mb"],
            "peak_reserved_mb": first.get("peak_reserved_mb"), "graph_memory": first.get("graph_memory"),
            **{k: first[k] for k in ("decode_ms_per_token", "query_ms_estimate") if k in first}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shape", default=None, help="bench shape (default: 7b on cuda, tiny on the cpu)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-check"))
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels")
    parser.add_argument("--site", default="/tmp/lisa-site", help="where the wheels are installed")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    parser.add_argument("--runs", type=int, default=6, help="timed runs per bench mode and setting")
    args = parser.parse_args(argv)

    def stop(signum: int, _frame: Any) -> None:
        for proc in RUNNING:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    args.shape = args.shape or ("7b" if args.device == "cuda" else "tiny")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    site = str(Path(args.site).resolve())
    deadline = time.monotonic() + args.budget
    report = Report(out, args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([site, str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    env.pop("CI", None)  # the lowest-transformers test skips here (its folder is not carried), as off CI
    py = sys.executable

    def left(limit: float) -> float:
        return min(limit, deadline - time.monotonic())

    # 1. environment
    code, secs, tail = run([py, "-c", ENVIRONMENT], env=env, timeout=left(60))
    environment: dict[str, Any] = {}
    try:
        environment = json.loads(tail.splitlines()[-1])
    except (ValueError, IndexError):
        pass
    smi = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], env=env,
              timeout=left(20)) if args.device == "cuda" else (None, 0.0, "")
    environment["nvidia_smi"] = smi[2]
    cuda_ok = args.device != "cuda" or bool(environment.get("cuda_available"))
    report.data["environment"] = environment
    report.add("environment", code == 0 and cuda_ok, secs, detail=tail if code != 0 or not cuda_ok else "")

    # 2. wheels
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if not wheels:
        report.add("wheels", False, 0.0, detail=f"no wheels in {args.wheels}: run scripts/gpu_wheels.sh here first "
                                                 "and carry the folder")
    else:
        code, secs, tail = run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--no-cache-dir", "--upgrade", "--target", site, *map(str, wheels)],
                               env=env, timeout=left(120))
        report.add("wheels", code == 0, secs, wheels=[w.name for w in wheels], detail=tail if code != 0 else "")

    # 3. imports
    code, secs, tail = run([py, "-c", IMPORTS, site], env=env, timeout=left(120))
    report.add("imports", code == 0, secs, detail=tail)

    # 4. tests
    tests = ["tests/test_cuda.py", "tests/test_transformers_versions.py"]
    select = ["-m", "not slow"] if args.device == "cpu" else []
    if args.device == "cpu":
        tests.append("tests/test_acceleration.py")
    xml = out / "tests.xml"
    xml.unlink(missing_ok=True)
    code, secs, tail = run([py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", *select,
                            f"--junitxml={xml}", *tests], env=env, timeout=left(270), log=out / "tests.log")
    summary: dict[str, Any] = {"exit": code}
    if xml.is_file():
        summary.update(junit_summary(xml))
    no_cuda = [s for s in summary.get("skips", []) if "needs a CUDA device" in s] if args.device == "cuda" else []
    ran = summary.get("tests", 0) - summary.get("skipped", 0)
    ok = code == 0 and ran > 0 and not no_cuda and not summary.get("failures") and not summary.get("errors")
    report.add("tests", ok, secs, **summary, cuda_skips_counted_as_failures=no_cuda, detail=tail if not ok else "")

    def bench_step(step: str, cmd: list[str], timeout: float, note: str = "") -> None:
        """Run one ``bench --compare --json`` command and add its step with the report's headline numbers."""
        code, secs, tail = run(cmd, env=env, timeout=timeout, stdout=out / f"{step}.json", log=out / f"{step}.log")
        detail: dict[str, Any] = {"command": " ".join(cmd[2:]), **({"note": note} if note else {})}
        ok = code == 0
        if ok:
            try:
                detail.update(bench_summary(out / f"{step}.json"))
            except (ValueError, KeyError, IndexError) as exc:
                ok, detail["detail"] = False, f"unreadable report: {exc!r}"
        else:
            detail["detail"] = tail if code is not None else f"killed after {secs:.0f} s\n{tail}"
        report.add(step, ok, secs, **detail)

    # 5. the bench, bf16 and 4-bit, one round each (the CPU: fp32, and int8 for 4-bit)
    cuda = args.device == "cuda"
    precision = ["--dtype", "bf16" if cuda else "fp32"]
    quantized = ["--quantization", "4bit" if cuda else "8bit", "--quant-backend", "torchao"]
    for name, extra in (("bf16" if cuda else "fp32", []), ("4bit" if cuda else "8bit", quantized)):
        step = f"bench_{args.shape}_{name}"
        if left(1e9) < 30:
            report.add(step, False, 0.0, detail="not run: the check's time budget is spent")
            continue
        cmd = [py, "-m", "lisa_agent.cli", "bench", "--shape", args.shape, "--device", args.device, *precision, *extra,
               "--runs", str(args.runs), "--warmup", "1", "--rounds", "1", "--reference-runs", "1",
               "--new-tokens", "8", "--compare", "--json"]
        if args.shape == "tiny":
            cmd += ["--image-size", "120x160"]
        note = "4-bit needs CUDA (torchao's int4 kernels): rehearsed with torchao int8" if name == "8bit" else ""
        bench_step(step, cmd, left(150), note)

    # 6. the reasoner's bench: VisionReasoner-7B's shape, bf16, levers on against off (the CPU: the tiny shape)
    step = "bench_reasoner"
    if left(1e9) < 30:
        report.add(step, False, 0.0, detail="not run: the check's time budget is spent")
    else:
        cmd = [py, "-m", "lisa_agent.cli", "bench", "--shape", "reasoner-7b" if cuda else "reasoner-tiny",
               "--device", args.device, *precision, "--runs", "3", "--warmup", "1", "--rounds", "1",
               "--new-tokens", "32", "--compare", "--json"]
        bench_step(step, cmd, left(180))

    report.data["finished"] = True
    report.data["ok"] = all(s["ok"] for s in report.data["steps"])
    report.write()
    print(f"[gpu_check] {'all steps passed' if report.data['ok'] else 'FAILED'}; report in {report.path}", flush=True)
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
