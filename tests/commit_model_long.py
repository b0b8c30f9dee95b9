"""The commit protocol's model-based test (tests/commit_model.py) in long mode.

    python tests/commit_model_long.py --long [--backend memory|local|s3|all] [--examples N] [--steps M]
                                      [--seed S] [--json OUT]

Runs many more random sequences than CI (tests/test_commit_model.py) and reports how many
sequences and steps ran, how many saves failed on purpose, and how many invariant checks passed.
``--backend s3`` starts its own SeaweedFS server. Exit status 0 when the invariant held throughout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from commit_model import Counts, local_dir, machine, memory_dir, s3_dir  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402


def run(backend: str, examples: int, steps: int, seed: int, incremental: bool = False) -> dict[str, object]:
    counts = Counts()
    server = None
    start = time.perf_counter()
    try:
        if backend == "memory":
            make = memory_dir
        elif backend == "local":
            make = local_dir(tempfile.mkdtemp(prefix="commit-model-"))
        else:
            from s3_server import SeaweedS3

            server = SeaweedS3().start()
            make = s3_dir(server.make_bucket(), server.storage_options)
        from hypothesis import seed as hseed

        test = hseed(seed)(lambda: run_state_machine_as_test(
            machine(make, counts, incremental),
            settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck)),
        ))
        ok, error = True, ""
        try:
            test()
        except Exception as exc:  # noqa: BLE001 - reported with the falsifying sequence
            ok, error = False, f"{type(exc).__name__}: {exc}"
    finally:
        if server is not None:
            server.stop()
    return {"backend": backend, "ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 1),
            **asdict(counts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="the long mode (default sizes below)")
    parser.add_argument("--backend", choices=("memory", "local", "s3", "all"), default="all")
    parser.add_argument("--examples", type=int, default=None, help="sequences per backend (long: 400)")
    parser.add_argument("--steps", type=int, default=None, help="max steps per sequence (long: 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--incremental", action="store_true", help="every save incremental (shared pieces)")
    args = parser.parse_args(argv)
    examples = args.examples or (400 if args.long else 30)
    steps = args.steps or (40 if args.long else 20)
    logging.disable(logging.WARNING)  # "tidying up failed" warnings are expected under injected faults
    backends = ["memory", "local", "s3"] if args.backend == "all" else [args.backend]
    reports = []
    for backend in backends:
        report = run(backend, examples if backend != "s3" else max(1, examples // 4), steps, args.seed,
                     args.incremental)
        reports.append(report)
        print(f"{backend:<7} {'OK' if report['ok'] else 'FAILED'}: {report['sequences']} sequences, "
              f"{report['steps']} save steps, {sum(report['rules'].values())} rule steps, "  # type: ignore[union-attr]
              f"{report['saves_ok']} saves ok / {report['saves_failed']} failed on purpose, "
              f"{report['checks']} invariant checks, {report['seconds']} s", flush=True)
        if not report["ok"]:
            print(report["error"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
