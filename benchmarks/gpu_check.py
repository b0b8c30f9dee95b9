"""Every check that needs a CUDA GPU, in one go (GPU time is short): run it, read OUT, done.

    python benchmarks/gpu_check.py --out DIR              # everything, 7-9 minutes on one H100/H200
    python benchmarks/gpu_check.py --out DIR --only stall  # one phase (names below)
    python benchmarks/gpu_check.py --out DIR --smoke       # the same phases on the CPU, tiny (to try it)

Phases, in order of value; each runs under its own limit (and the run under ``--budget`` in all),
and leaves its log -- and the benchmark's JSON -- in DIR the moment it ends, so a run cut short
still reports every phase that finished (``DIR/summary.json``, rewritten after each phase):

``env``        the GPU, driver, torch, Lightning (``nvidia-smi``, ``benchmarks/machine.py``).
               Before it, the packages the phases import are checked (exit 2, naming them).
``cuda-tests`` the tests that need CUDA: tests/test_cuda.py (a faked GPU file is byte for byte what
               a GPU writes; CPU checkpoints onto the GPU with map_location; CUDA random states),
               tests/test_device_round_trip.py (a real run GPU -> CPU-only process -> GPU, each leg
               resuming exactly from the last one's checkpoint), and the CUDA tests of the async
               saver and the callback.
``cpu-side``   tests/test_cross_device.py with the GPUs hidden (``CUDA_VISIBLE_DEVICES=""``).
``stall``      ``save_stall.py --device cuda --params 386M`` (the setup of ``shared/ANCHORS.md``):
               stall p50/max, time until durable, extra GPU and host memory of every method, side
               by side (raw pinned copy, Lightning sync, ``AsyncCheckpointIO``, DCP ``async_save``,
               ours), no training runs.
``overhead``   training overhead with a save every 100 steps at the same size: ours async between
               two no-save runs (ANCHORS.md has Lightning's and DCP's on an H100; add methods with
               ``save_stall.py --methods`` when time is left).

Exit status: 0 when every phase run passed, 1 when one failed, 2 when a package is missing.
Nothing here needs the network. At most 8 files land in DIR (what the device tool brings back).

On the project's H200 machine (python3 3.12 with torch and Lightning, no network), two packages
the library or its tests need are missing -- torchdata (exact resume) and cryptography (with cffi
and pycparser; encryption tests) -- so carry them as wheels. Here, once, in the repository::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl torchdata==0.11.0 cryptography==48.0.0 cffi==2.0.0 pycparser==3.0

and the device command (``carry: [".whl"]``, ``timeout_s: 600``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: all phases together: one device command may run 600 s, and the machine needs a little of it
BUDGET_S = 560.0
SAVE_STALL = str(REPO / "benchmarks" / "save_stall.py")
#: the existing tests that need CUDA, beside the two files made for this check
CUDA_TESTS = [
    "tests/test_cuda.py",
    "tests/test_device_round_trip.py",
    "tests/test_async_saver.py::test_cuda_state_is_copied_into_pinned_buffers_exactly",
    "tests/test_callback.py::test_gpu_checkpoint_loads_on_cpu_and_back",
]


#: what the phases import: the library, its tests (encryption, exact resume) and the benchmark
NEEDED = ["torch", "lightning", "lightning_ckpt", "torchdata", "cryptography", "safetensors", "hypothesis",
          "pytest", "rich", "fsspec", "numpy"]


@dataclass
class Phase:
    name: str
    limit_s: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    json_name: str | None = None


def phases(out: Path, smoke: bool) -> list[Phase]:
    """The phases; ``smoke``: the same commands on the CPU, tiny, to try this script anywhere."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
              "-m", "not s3 and not gcs and not azure"]  # no object-store servers there
    size = ["--device", "cpu", "--quick"] if smoke else ["--device", "cuda", "--params", "386M"]
    env_code = (
        "import json, subprocess, torch, lightning; from benchmarks.machine import describe; "
        "print(subprocess.run(['nvidia-smi'], capture_output=True, text=True).stdout if not "
        f"{smoke} else ''); "
        "print(json.dumps({'torch': torch.__version__, 'lightning': lightning.__version__, "
        "'cuda': torch.version.cuda, 'devices': [torch.cuda.get_device_name(i) "
        "for i in range(torch.cuda.device_count())], 'machine': describe('torch', 'lightning')}, indent=1, default=str))"
    )
    return [
        Phase("env", 60, [sys.executable, "-c", env_code]),
        # the all-CPU round trip is the CPU machines' variant: not worth GPU time
        Phase("cuda-tests", 200, [*pytest, *CUDA_TESTS, *([] if smoke else ["-k", "not cpu-cpu-cpu"])]),
        Phase("cpu-side", 90, [*pytest, "tests/test_cross_device.py"], env={"CUDA_VISIBLE_DEVICES": ""}),
        # two saves per method (a cold and a warm one), as ANCHORS.md's figures: ~150 s at 386M
        Phase("stall", 200, [sys.executable, SAVE_STALL, *size, "--saves", "1", "--no-training",
                             "--json", str(out / "stall.json")], json_name="stall.json"),
        Phase("overhead", 170, [sys.executable, SAVE_STALL, *size, "--saves", "1",
                                "--interval-steps", "4" if smoke else "100", "--train-steps", "8" if smoke else "200",
                                # ours only: each method costs ~90 s more (its run and a baseline);
                                # ANCHORS.md has the others' overhead on an H100
                                "--methods", "ours_async", "--json", str(out / "overhead.json")],
              json_name="overhead.json"),
    ]


def run_phase(phase: Phase, out: Path, limit_s: float) -> dict[str, object]:
    log = out / f"{phase.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **phase.env}
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(phase.argv) + "\n")
        f.flush()
        # a session of its own: on a timeout the whole group goes (the benchmark's worker
        # processes hold GPU memory the next phase needs)
        proc = subprocess.Popen(phase.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"timed out after {limit_s:.0f} s"
    result: dict[str, object] = {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "log": log.name}
    if phase.json_name and (out / phase.json_name).exists():
        result["json"] = phase.json_name
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="where logs and JSON go ($OUT)")
    p.add_argument("--only", nargs="+", default=None, help="run only these phases")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all phases together")
    p.add_argument("--smoke", action="store_true", help="the same phases on the CPU, tiny (to try the script)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = phases(out, args.smoke)
    unknown = set(args.only or ()) - {ph.name for ph in todo}
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(ph.name for ph in todo)}")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here (use --smoke to try the script on the CPU)")
    missing = _missing(NEEDED)
    if missing:
        print(f"[gpu-check] missing Python packages: {', '.join(missing)} -- carry them as wheels "
              "(see the top of benchmarks/gpu_check.py)", file=sys.stderr)
        return 2
    summary: dict[str, object] = {"smoke": args.smoke, "phases": {}}
    deadline = time.perf_counter() + args.budget
    for phase in todo:
        if args.only and phase.name not in args.only:
            continue
        left = deadline - time.perf_counter()
        if left < 20:
            summary["phases"][phase.name] = {"rc": "not run: the budget is spent"}  # type: ignore[index]
        else:
            print(f"[gpu-check] {phase.name} (up to {min(phase.limit_s, left):.0f} s) ...", file=sys.stderr, flush=True)
            summary["phases"][phase.name] = run_phase(phase, out, min(phase.limit_s, left))  # type: ignore[index]
        print(f"[gpu-check] {phase.name}: {summary['phases'][phase.name]}", file=sys.stderr, flush=True)  # type: ignore[index]
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    failed = [n for n, r in summary["phases"].items() if r.get("rc") != 0]  # type: ignore[attr-defined]
    return 1 if failed else 0


def _missing(modules: list[str]) -> list[str]:
    """The ``modules`` that do not import in a fresh interpreter (this one may differ from the phases')."""
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try: importlib.import_module(m)\n"
            "    except Exception: print(m)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    return proc.stdout.split() or ([f"(the check failed: {proc.stderr.strip()[-300:]})"] if proc.returncode else [])


if __name__ == "__main__":
    sys.exit(main())
