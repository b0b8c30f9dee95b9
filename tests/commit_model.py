"""A model-based test of the commit protocol: a hypothesis ``RuleBasedStateMachine``.

Random sequences of save / re-save of the same name / copy / delete / prune / cleanup / a second
writer acting in the middle of a save / load, each write or delete possibly failing (a fault of
the fault-injecting filesystem at the nth call of one operation, once or for good, i.e. a crash
that also defeats the save's own clean-up), against one backend (memory, local disk or S3).

After every step the invariant is checked through a manager *without* faults:

    every save that returned success, and not since replaced by a committed newer version or
    deleted by us on purpose, loads and verifies; no file we did not write is touched.

The model keeps, per name, the set of values the name may hold: one value after a save that
returned success; after a failed save or delete, what it held before *or* the new outcome (a
failure may still have committed). Anything outside that set -- an older version coming back, a
checkpoint gone, a damaged manifest, a foreign file changed -- fails the test. With
``incremental=True`` every save is incremental (a frozen tensor shared by every checkpoint, the
value's tensor a piece of its own): then also every piece a committed checkpoint references must
load, and after a fault-free cleanup no pack file is left that no manifest references. Used by
tests/test_commit_model.py (bounded, in CI) and tests/commit_model_long.py (the long mode).
"""

from __future__ import annotations

import errno
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import torch
from faulty_fs import Fault, FaultPlan, register
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lightning_ckpt import CheckpointManager, Incremental, KeepLatest, NameTakenError, RetryPolicy
from lightning_ckpt import pieces

ABSENT = -1
NAMES = ["a.ckpt", "b.ckpt", "last.ckpt"]
#: files a user (or Lightning) put there: never overwritten, never deleted
FOREIGN = {"foreign.ckpt": b"Lightning's own checkpoint", "notes.lckpt-tmp-keep.txt": b"user notes",
           "run.lckpt-tmp-3.ckpt": b"a name that looks like ours"}
OPS = ["open_write", "write", "close", "mv", "rm", "info", "copy", "read", "ls"]
ONCE = RetryPolicy(attempts=1, initial_delay=0.0)


@dataclass
class Counts:
    """How much ran: sequences (examples) and steps, over every machine built from one factory."""

    sequences: int = 0
    steps: int = 0
    saves_ok: int = 0
    saves_failed: int = 0
    checks: int = 0
    #: how often each rule ran
    rules: dict[str, int] = field(default_factory=dict)


Dirs = Callable[[], tuple[str, dict[str, Any], str, dict[str, Any]]]


#: the tensor every checkpoint of an incremental run shares (stored once)
FROZEN = torch.arange(512, dtype=torch.float32)


def machine(make_dir: Dirs, counts: Counts, incremental: bool = False) -> type[RuleBasedStateMachine]:
    """A state machine class over a backend; ``make_dir()`` returns a fresh directory as
    (URL, storage options, the same directory behind faulty://, its options without the plan)."""

    class CommitProtocol(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            register()
            self.plan = FaultPlan()
            url, options, faulty_url, faulty_options = make_dir()
            self.direct = CheckpointManager(url, options, retry=ONCE)
            fopts = {**faulty_options, "plan": self.plan}
            self.writer = CheckpointManager(faulty_url, fopts, retry=ONCE)
            self.second = CheckpointManager(faulty_url, fopts, retry=ONCE)
            self.possible: dict[str, set[int]] = {n: {ABSENT} for n in NAMES}
            # one shortcut cache per writer, as one per run
            self.inc = {id(m): Incremental(min_bytes=256) for m in (self.direct, self.writer, self.second)}
            self.step = 0
            counts.sequences += 1

        @initialize()
        def foreign_files(self) -> None:
            for name, data in FOREIGN.items():
                self.direct.storage.write_bytes(name, data)

        # -- helpers ----------------------------------------------------------------------

        def _arm(self, op: str | None, nth: int, persistent: bool) -> None:
            self.plan.clear()
            if op is not None:
                self.plan.add(Fault(op=op, nth=nth, times=None if persistent else 1,  # type: ignore[arg-type]
                                    exc=OSError(errno.EIO, "injected")))

        def _next(self) -> int:
            self.step += 1
            counts.steps += 1
            return self.step

        def _state(self, value: int) -> dict[str, Any]:
            if not incremental:
                return {"v": torch.full((64,), float(value)), "value": value}
            return {"v": torch.full((64,), float(value)), "value": value, "frozen": FROZEN,
                    "big": torch.full((128,), float(value))}

        def _save(self, mgr: CheckpointManager, name: str, value: int, **kw: Any) -> bool:
            state = self._state(value)
            if incremental:
                job = self.inc[id(mgr)].prepare(state)
                write = kw.pop("write", None)
                if write is not None:  # the second writer acts after the pieces, before payload and manifest
                    original = job.write
                    job.write = lambda *a: (original(*a), write(None))[0]  # type: ignore[method-assign]
                state, kw["incremental"] = job.state, job
            try:
                mgr.save(state, name, global_step=value, **kw)
            except NameTakenError:
                raise AssertionError(f"a save of {name} by its only owner was refused") from None
            except Exception:  # noqa: BLE001 - a failed save is allowed, a lost checkpoint is not
                self.plan.clear()
                self.possible[name].add(value)
                counts.saves_failed += 1
                return False
            self.plan.clear()
            self.possible[name] = {value}
            counts.saves_ok += 1
            return True

        # -- rules ------------------------------------------------------------------------

        @rule(name=st.sampled_from(NAMES), op=st.sampled_from(OPS), nth=st.integers(1, 8), persistent=st.booleans())
        def save(self, name: str, op: str | None, nth: int, persistent: bool) -> None:
            counts.rules["save"] = counts.rules.get("save", 0) + 1
            self._arm(op, nth, persistent)
            self._save(self.writer, name, self._next())

        @rule(name=st.sampled_from(NAMES))
        def save_directly(self, name: str) -> None:  # the backend's own write path (atomic rename, multipart)
            counts.rules["save_directly"] = counts.rules.get("save_directly", 0) + 1
            self.plan.clear()
            self._save(self.direct, name, self._next())

        @rule(name=st.sampled_from(NAMES), other=st.sampled_from(NAMES), what=st.sampled_from(["save", "cleanup"]))
        def second_writer_in_the_middle(self, name: str, other: str, what: str) -> None:
            """A second writer (a requeued job) acts while the first is between payload and manifest."""
            counts.rules["second_writer_in_the_middle"] = counts.rules.get("second_writer_in_the_middle", 0) + 1
            self.plan.clear()
            value, inner = self._next(), self._next()
            done: list[bool] = []

            def write(stream: Any) -> None:
                if stream is not None:
                    torch.save(self._state(value), stream)
                if what == "cleanup":
                    self.second.cleanup()
                else:
                    done.append(self._save(self.second, other, inner))

            self._save(self.writer, name, value, write=write)

        @rule(name=st.sampled_from(NAMES), op=st.none() | st.sampled_from(OPS), nth=st.integers(1, 4),
              persistent=st.booleans())
        def delete(self, name: str, op: str | None, nth: int, persistent: bool) -> None:
            counts.rules["delete"] = counts.rules.get("delete", 0) + 1
            if self.possible[name] == {ABSENT}:
                return
            self._arm(op, nth, persistent)
            try:
                self.writer.delete(name)
            except Exception:  # noqa: BLE001
                self.possible[name].add(ABSENT)
            else:
                self.possible[name] = {ABSENT}
            self.plan.clear()

        @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES), op=st.none() | st.sampled_from(OPS),
              nth=st.integers(1, 4))
        def copy(self, src: str, dst: str, op: str | None, nth: int) -> None:
            counts.rules["copy"] = counts.rules.get("copy", 0) + 1
            if src == dst or ABSENT in self.possible[src]:
                return
            self._arm(op, nth, False)
            values = set(self.possible[src])
            try:
                self.writer.copy(src, dst)
            except Exception:  # noqa: BLE001
                self.possible[dst] |= values
            else:
                self.possible[dst] = values
            self.plan.clear()

        @rule(keep=st.integers(1, 2), op=st.none() | st.sampled_from(["rm", "ls", "read"]), nth=st.integers(1, 4))
        def prune(self, keep: int, op: str | None, nth: int) -> None:
            counts.rules["prune"] = counts.rules.get("prune", 0) + 1
            self._arm(op, nth, False)
            newest = max((max(v) for v in self.possible.values()), default=ABSENT)
            try:
                self.writer.prune(KeepLatest(keep))
            except Exception:  # noqa: BLE001
                pass
            self.plan.clear()
            holders = [n for n, v in self.possible.items() if v == {newest}]
            for name, values in self.possible.items():
                # retention may delete on purpose, never the newest (with copies of the same step,
                # one of them: which one the model does not track)
                if len(holders) != 1 or values != {newest}:
                    values.add(ABSENT)

        @rule(op=st.none() | st.sampled_from(["rm", "ls", "read", "info"]), nth=st.integers(1, 4))
        def cleanup(self, op: str | None, nth: int) -> None:
            counts.rules["cleanup"] = counts.rules.get("cleanup", 0) + 1
            self._arm(op, nth, False)
            try:
                self.writer.cleanup()
            except Exception:  # noqa: BLE001 - a failed cleanup may leave leftovers, never lose data
                pass
            self.plan.clear()

        @precondition(lambda self: self.step > 0)
        @rule()
        def cleanup_completely(self) -> None:
            """No save is in flight now: a cleanup without faults leaves nothing but checkpoints."""
            counts.rules["cleanup_completely"] = counts.rules.get("cleanup_completely", 0) + 1
            self.plan.clear()
            self.direct.cleanup()
            found = self.direct.scan()
            assert found.leftovers == [] and found.in_progress == [], (found.leftovers, found.in_progress)
            files = {f.name for f in self.direct.storage.list()}
            referenced = set().union(*(pieces.table_of(m).files for m in found.committed if m.pieces))
            assert {f for f in files if pieces.is_pack(f)} == referenced, "an unreferenced pack survived cleanup"


        # -- the invariant ------------------------------------------------------------------

        @invariant()
        def every_committed_save_loads(self) -> None:
            self.plan.clear()
            counts.checks += 1
            found = self.direct.scan()
            assert found.damaged == [] and found.orphaned == [], (found.damaged, found.orphaned)
            for name, values in self.possible.items():
                try:
                    loaded = self.direct.load(name)
                    got = int(loaded["value"])
                except FileNotFoundError:
                    got = ABSENT
                else:
                    assert torch.equal(loaded["v"], torch.full((64,), float(got)))
                    if incremental:  # every piece it references is there and right
                        assert torch.equal(loaded["frozen"], FROZEN)
                        assert torch.equal(loaded["big"], torch.full((128,), float(got)))
                assert got in values, f"{name} holds {got}, but only {sorted(values)} are allowed"
                self.possible[name] = {got}
            for name, data in FOREIGN.items():
                assert self.direct.storage.read_bytes(name) == data, f"{name} (not ours) was touched"

    return CommitProtocol


def memory_dir() -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    root = f"m-{uuid.uuid4().hex[:10]}/ckpts"
    return f"memory://{root}", {}, f"faulty://{root}", {"target_protocol": "memory"}


def local_dir(base: str) -> Dirs:
    def make() -> tuple[str, dict[str, Any], str, dict[str, Any]]:
        path = f"{base}/{uuid.uuid4().hex[:10]}"
        return path, {}, f"faulty://{path}", {"target_protocol": "file"}

    return make


def s3_dir(bucket_url: str, options: dict[str, Any]) -> Dirs:
    bucket = bucket_url.removeprefix("s3://")

    def make() -> tuple[str, dict[str, Any], str, dict[str, Any]]:
        prefix = f"{bucket}/{uuid.uuid4().hex[:10]}"
        return f"s3://{prefix}", options, f"faulty://{prefix}", {"target_protocol": "s3", "target_options": options}

    return make
