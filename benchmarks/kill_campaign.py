"""Kill campaign: SIGKILL a checkpointing training run at random moments, resume, check everything.

    python benchmarks/kill_campaign.py [--kills N] [--backend local|s3] [--quick] [--json OUT]

Each attempt starts tests/kill_run.py (the exact-resume run, a checkpoint at every step, always
``ckpt_path="last"``) in a fresh process and SIGKILLs it after a random delay (seeded RNG). Half
the attempts route storage through the fault-injecting ``faulty://`` filesystem with slowed
payload writes and commits (and, on it, non-atomic writes: a payload grows in place), so kills
land inside writes and commits often; the other half use the backend as is (local disk: a
temporary file + fsync + rename; S3: a single or multipart upload).

After every kill the directory is inspected to say where the kill landed:

- ``between_saves``: no ``.pending`` marker of a save, no temporary file;
- ``save_started``: only the marker (on S3 also: the upload is still in flight, invisible);
- ``inside_payload_write``: a temporary file, or a partial payload beside the marker;
- ``inside_commit``: the payload is complete and the manifest is missing, partial, or written
  but the marker not yet removed.

and checked: every committed (visible) checkpoint verifies; nothing committed before is gone
(``lost``: a checkpoint seen committed after an earlier kill that no longer verifies, or a name --
``last.ckpt`` is re-saved at every step -- that went back to an older version or vanished); the next attempt resumes from the newest committed step (read from its output; on S3
a manifest PUT already on the wire may still complete after the kill: ``late_commits``) and,
when it starts training, the leftovers of the interrupted save are gone (cleanup at start). A
round ends when an attempt finishes by itself; its final model and optimizer state must equal
an uninterrupted run's bit for bit (``torch.equal``). Prints a summary table; ``--json`` dumps it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
RUNNER = TESTS / "kill_run.py"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(ROOT))

from lightning_ckpt import CheckpointManager, CheckpointWarning
from lightning_ckpt.integrity import MANIFEST_SUFFIX
from lightning_ckpt import layout, pieces

LANDINGS = ("between_saves", "save_started", "inside_payload_write", "inside_commit")


class Run:
    """One attempt: a runner process, started and waited on until it trains."""

    def __init__(self, url: str, steps: int, out: str, options: dict[str, Any], slow: float, pad_mb: float,
                 incremental: bool = False) -> None:
        args = [sys.executable, str(RUNNER), url, str(steps), out, "--options", json.dumps(options),
                "--slow", str(slow), "--pad-mb", str(pad_mb)] + (["--incremental"] if incremental else [])
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.resumed_step: int | None = None

    def wait_ready(self, timeout: float = 180.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("READY"):
                self.resumed_step = int(line.split()[1].split("=")[1])
                return
        self.proc.kill()
        _, err = self.proc.communicate()
        raise RuntimeError(f"the runner never became ready:\n{err[-4000:]}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill_after(self, delay: float) -> bool:
        """SIGKILL after ``delay`` seconds; False if the run had finished by itself."""
        try:
            self.proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc.communicate()
            return True
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"the runner failed (rc {self.proc.returncode}):\n{err[-4000:]}")
        return False


def loads(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not a complete payload"
        return False
    return True


def inspect(manager: CheckpointManager) -> dict[str, Any]:
    """Where a kill landed, the committed checkpoints (all verified) and the leftovers."""
    storage = manager.storage
    files = {f.name for f in storage.list()}
    markers = sorted(f for f in files if layout.marker_of(f) is not None)
    temps = sorted(f for f in files if layout.is_temp(f))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CheckpointWarning)
        committed = manager.manifests()
    bad_manifests = len(caught)
    verified, failed = {}, []
    for m in committed:
        try:
            manager.verify(m.name)
            verified[m.name] = m.global_step or 0
        except Exception as exc:  # noqa: BLE001 - recorded, reported as a failure
            failed.append(f"{m.name}: {exc}")
    landing = "between_saves"
    for fname in markers:
        marker = layout.Marker.parse(fname, storage.read_bytes(fname))
        physical = marker.physical or marker.name
        if marker.op == "delete":
            continue
        if manifest_token(manager, marker.name, files) == marker.token:
            landing = "inside_commit"  # committed; the old version not yet retired or the marker not removed
        elif physical in files and loads(storage.read_bytes(physical)):
            landing = "inside_commit"  # payload complete, manifest missing or partial
        elif physical in files or any(t.endswith("." + physical) for t in temps) or (
                marker.token and any(f.endswith(pieces.pack_name(marker.token)) for f in files)):
            landing = "inside_payload_write"  # (an incremental save's pieces count as its payload)
        else:
            landing = "save_started"
    if not markers and temps:
        landing = "inside_payload_write"
    found = manager.scan()
    leftovers = list(found.leftovers)  # the writer is dead: exactly what cleanup() removes
    referenced = set().union(*(pieces.table_of(m).files for m in found.committed if m.pieces))
    leftovers += [f for f in files if pieces.is_pack(f) and f not in referenced]  # packs of an interrupted save
    return {"landing": landing, "verified": verified, "failed": failed, "leftovers": sorted(set(leftovers)),
            "bad_manifests": bad_manifests}


def manifest_token(manager: CheckpointManager, name: str, files: set[str]) -> str | None:
    if name + MANIFEST_SUFFIX not in files:
        return None
    try:
        return manager.read_manifest(name).token
    except Exception:  # noqa: BLE001
        return None


def identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["step"] != b["step"] or a["model"].keys() != b["model"].keys():
        return False
    if not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(v, sb[p][k]) if isinstance(v, torch.Tensor) else v == sb[p][k]
        for p, st in sa.items() for k, v in st.items())


def campaign(kills: int, backend: str, steps: int, seed: int, slow: float, pad_mb: float,
             log: Any = print, incremental: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="kill-campaign-"))
    server = None
    stats: dict[str, Any] = {
        "backend": backend, "seed": seed, "steps_per_round": steps, "pad_mb": pad_mb, "slow_write_s": slow,
        "kills": 0, "landing": dict.fromkeys(LANDINGS, 0), "kills_slowed_fs": 0, "attempts": 0,
        "rounds": 0, "rounds_identical": 0, "checkpoints_committed": 0, "checkpoints_verified": 0,
        "checkpoints_lost": 0, "verify_failures": 0, "resume_mismatches": 0, "late_commits": 0, "leftovers_found": 0,
        "leftovers_cleaned": 0, "leftovers_remaining_at_start": 0, "partial_manifests_seen": 0,
        "max_leftovers_at_once": 0, "problems": [],
    }
    try:
        options: dict[str, Any] = {}
        if backend == "s3":
            from s3_server import SeaweedS3

            server = SeaweedS3().start()
            options = server.storage_options
        ref_out = str(work / "reference.pt")
        ref = Run(str(work / "reference"), steps, ref_out, {}, 0.0, pad_mb, incremental)
        ref.wait_ready()
        ref.go()
        ref.kill_after(600)
        reference = torch.load(ref_out, weights_only=True)
        rate = {0.0: 20.0, slow: 20.0}  # steps per second, learnt as we go
        round_no = 0
        while stats["kills"] < kills:
            round_no += 1
            url = (server.make_bucket() + "/run") if server is not None else str(work / f"round{round_no}")
            manager = CheckpointManager(url, options)
            seen: dict[str, int] = {}
            expected, previous_leftovers = 0, []
            out = str(work / f"round{round_no}.pt")
            while True:
                last_kill = stats["kills"] >= kills
                mode = 0.0 if last_kill or rng.random() < 0.5 else slow
                run = Run(url, steps, out, options, mode, pad_mb, incremental)
                run.wait_ready()
                stats["attempts"] += 1
                start = inspect(manager)
                newest_at_start = max(start["verified"].values(), default=0)
                if run.resumed_step != expected:
                    if run.resumed_step == newest_at_start > expected:
                        # S3: the manifest PUT was on the wire when the client died and the server
                        # completed it after our post-kill look; the rerun rightly resumed from it
                        stats["late_commits"] += 1
                        seen.update(start["verified"])
                    else:
                        stats["resume_mismatches"] += 1
                        stats["problems"].append(
                            f"round {round_no}: resumed at {run.resumed_step}, expected {expected}")
                at_start = start["leftovers"]
                stats["leftovers_remaining_at_start"] += len(at_start)
                stats["leftovers_cleaned"] += len([f for f in previous_leftovers if f not in at_start])
                run.go()
                delay = 600.0 if last_kill else rng.uniform(0.0, 3.0 / rate[mode])
                killed = run.kill_after(delay)
                state = inspect(manager)
                stats["verify_failures"] += len(state["failed"])
                stats["problems"] += [f"round {round_no}: {f}" for f in state["failed"]]
                stats["partial_manifests_seen"] += state["bad_manifests"]
                # lost: a checkpoint seen committed that no longer loads, or a name that went back to
                # an older version (the previous version of a replaced name counts until replaced)
                lost = [n for n in seen if n not in state["verified"] or state["verified"][n] < seen[n]]
                stats["checkpoints_lost"] += len(lost)
                stats["problems"] += [f"round {round_no}: lost {n}" for n in lost]
                seen.update(state["verified"])
                new = max(state["verified"].values(), default=0)
                if killed and delay > 0:
                    progress = max(0, new - expected)
                    rate[mode] = 0.7 * rate[mode] + 0.3 * max(progress / delay, 0.5)
                expected = new
                if not killed:
                    break
                stats["kills"] += 1
                stats["kills_slowed_fs"] += mode > 0
                stats["landing"][state["landing"]] += 1
                stats["leftovers_found"] += len(state["leftovers"])
                stats["max_leftovers_at_once"] = max(stats["max_leftovers_at_once"], len(state["leftovers"]))
                previous_leftovers = state["leftovers"]
                log(f"kill {stats['kills']:4d}/{kills} round {round_no} after {delay:5.2f}s "
                    f"{'slow' if mode else 'plain'}: {state['landing']:<21} resumed@{run.resumed_step:<3} "
                    f"newest committed {new:<3} leftovers {len(state['leftovers'])}")
            stats["rounds"] += 1
            stats["checkpoints_committed"] += len(seen)
            stats["checkpoints_verified"] += len(seen)
            same = identical(reference, torch.load(out, weights_only=True))
            stats["rounds_identical"] += same
            if not same:
                stats["problems"].append(f"round {round_no}: final model differs from the uninterrupted run")
            log(f"round {round_no} finished: final model {'IDENTICAL' if same else 'DIFFERENT'}")
    finally:
        if server is not None:
            server.stop()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    stats["final_identical"] = stats["rounds"] > 0 and stats["rounds_identical"] == stats["rounds"]
    stats["ok"] = (stats["final_identical"] and stats["checkpoints_lost"] == 0 and stats["verify_failures"] == 0
                   and stats["resume_mismatches"] == 0 and stats["leftovers_remaining_at_start"] == 0)
    return stats


def table(stats: dict[str, Any]) -> str:
    rows = [
        ("backend", stats["backend"]),
        ("kills", stats["kills"]),
        ("  between saves", stats["landing"]["between_saves"]),
        ("  save started (marker only)", stats["landing"]["save_started"]),
        ("  inside payload write", stats["landing"]["inside_payload_write"]),
        ("  inside commit", stats["landing"]["inside_commit"]),
        ("  on the slowed faulty:// view", stats["kills_slowed_fs"]),
        ("attempts (processes)", stats["attempts"]),
        ("rounds (runs to the end)", stats["rounds"]),
        ("checkpoints committed, all verified", stats["checkpoints_verified"]),
        ("checkpoints lost", stats["checkpoints_lost"]),
        ("verify failures", stats["verify_failures"]),
        ("resumed from a step other than the newest committed", stats["resume_mismatches"]),
        ("  commits completed by the server after the kill", stats["late_commits"]),
        ("leftovers found after kills", stats["leftovers_found"]),
        ("leftovers cleaned at the next start", stats["leftovers_cleaned"]),
        ("leftovers still there when training resumed", stats["leftovers_remaining_at_start"]),
        ("partial manifests seen (skipped with a warning)", stats["partial_manifests_seen"]),
        ("final model identical to uninterrupted", f"{stats['rounds_identical']}/{stats['rounds']} rounds"),
        ("OK", "yes" if stats["ok"] else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--backend", choices=("local", "s3"), default="local")
    parser.add_argument("--quick", action="store_true", help="5 kills on local disk, short rounds (for CI)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow", type=float, default=0.002, help="seconds per payload write on the slowed view")
    parser.add_argument("--pad-mb", type=float, default=2.0, help="extra payload size (a wider write window)")
    parser.add_argument("--json", help="write the summary as JSON here")
    parser.add_argument("--incremental", action="store_true", help="incremental saves (the pad is stored once)")
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.backend, args.steps = min(args.kills, 5), "local", 12
    stats = campaign(args.kills, args.backend, args.steps, args.seed, args.slow, args.pad_mb,
                     incremental=args.incremental)
    print(table(stats))
    for problem in stats["problems"]:
        print("PROBLEM:", problem)
    if args.json:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.json)
        Path(args.json).write_text(json.dumps(stats, indent=1))
    return 0 if stats["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
