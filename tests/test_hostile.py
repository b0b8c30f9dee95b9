"""Hostile inputs (issue 15): nothing we read runs code, no junk manifest blocks anyone, no wrong key
or downgrade passes silently, no special file hangs a reader, and the command line never tracebacks.

Every case builds the hostile input the way an attacker with write access to the directory would
(a self-consistent, re-hashed, unsigned manifest where that is what it takes), then checks the
error a user sees, that it is the builtin they would catch, and that no code ran.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from backends import backend  # noqa: F401

from lightning_ckpt import (
    CheckpointManager,
    CheckpointWarning,
    CorruptCheckpointError,
    KeepLatest,
    TamperedCheckpointError,
    UnsafeCheckpointError,
)
from lightning_ckpt.integrity import Manifest, manifest_name
from lightning_ckpt.security import Encryptor, Signer
from lightning_ckpt.sharded import ShardedCheckpointer, consolidate

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
]

KEY, OTHER_KEY = b"k" * 32, b"o" * 32


class Armed:
    """Unpickling this runs ``os.mkdir(marker)`` (what ``os.system`` would be in a real attack)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from lightning_ckpt.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> None:
    """What every failing command prints: exactly one ``error:`` line, never a traceback."""
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")], err


# -- 1. code execution from a sharded checkpoint's DCP metadata -----------------------------------


def sharded(mgr: CheckpointManager, name: str, step: int = 1) -> None:
    tensors = {"state_dict": {"layer.weight": torch.full((4, 2), float(step))}}
    ShardedCheckpointer(mgr).save(tensors, {"epoch": 0, "global_step": step}, name, global_step=step)


def rehash(mgr: CheckpointManager, name: str) -> None:
    """Rewrite ``name``'s unsigned manifest so that it matches its files again (what an attacker does)."""
    old = mgr.read_manifest(name)
    directory = mgr.storage.child(name)
    table = {f.name: directory.digest(f.name) for f in directory.list()}
    fresh = Manifest.for_files(name, table, global_step=old.global_step)
    mgr.storage.write_bytes(manifest_name(name), fresh.to_json())


@pytest.fixture
def forged_metadata(tmp_path: Path) -> tuple[CheckpointManager, Path]:
    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    marker = tmp_path / "pwned"
    (tmp_path / "run" / "s.ckpt" / ".metadata").write_bytes(pickle.dumps(Armed(str(marker))))
    rehash(mgr, "s.ckpt")
    mgr.verify("s.ckpt")  # self-consistent: verification alone cannot tell
    return mgr, marker


def test_forged_dcp_metadata_does_not_run_code_in_consolidate(forged_metadata) -> None:
    mgr, marker = forged_metadata
    with pytest.raises(UnsafeCheckpointError, match="mkdir") as info:
        consolidate(mgr, "s.ckpt")
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_forged_dcp_metadata_does_not_run_code_in_a_sharded_load(forged_metadata) -> None:
    mgr, marker = forged_metadata
    with pytest.raises(UnsafeCheckpointError):
        ShardedCheckpointer(mgr).load("s.ckpt", model())
    assert not marker.exists()


def model() -> torch.nn.Module:
    """A module whose state dict is what :func:`sharded` saves."""
    module = torch.nn.Module()
    module.layer = torch.nn.Linear(2, 4, bias=False)
    return module


@pytest.mark.parametrize("command", ["inspect", "export", "diff"])
def test_forged_dcp_metadata_does_not_run_code_in_the_cli(forged_metadata, capsys, tmp_path, command) -> None:
    mgr, marker = forged_metadata
    url = mgr.url_of("s.ckpt")
    argv = {"inspect": ["inspect", url], "export": ["export", url, "-o", str(tmp_path / "w.safetensors")],
            "diff": ["diff", url, url]}[command]
    code, out, err = cli(capsys, *argv)
    assert code == 1 and not marker.exists()
    assert "Traceback" not in out + err
    assert "posix.mkdir" in out + err and "refusing" in out + err


def test_forged_metadata_in_a_directory_lightning_wrote_does_not_run_code(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    (tmp_path / "run" / manifest_name("s.ckpt")).unlink()  # "a sharded directory Lightning wrote itself"
    marker = tmp_path / "pwned"
    (tmp_path / "run" / "s.ckpt" / ".metadata").write_bytes(pickle.dumps(Armed(str(marker))))
    with pytest.warns(CheckpointWarning), pytest.raises(UnsafeCheckpointError):
        ShardedCheckpointer(mgr).load("s.ckpt", model())
    assert not marker.exists()


def test_junk_dcp_metadata_is_a_corrupt_checkpoint(tmp_path: Path, capsys) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    (tmp_path / "run" / "s.ckpt" / ".metadata").write_bytes(b"\x80\x04junk that is no pickle")
    rehash(mgr, "s.ckpt")
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata"):
        consolidate(mgr, "s.ckpt")
    code, out, err = cli(capsys, "inspect", mgr.url_of("s.ckpt"))
    assert code == 1 and "Traceback" not in out + err


def test_genuine_dcp_metadata_still_loads(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    tensors = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16),
                              "i": torch.arange(3), "flag": torch.ones(1, dtype=torch.bool)},
               "optimizer_0": {"state": {"w": {"step": torch.tensor(2.0)}},
                               "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["w"], "foreach": None}]}}
    ShardedCheckpointer(mgr).save(tensors, {"epoch": 0}, "s.ckpt")
    full = consolidate(mgr, "s.ckpt")
    assert torch.equal(full["state_dict"]["w"], tensors["state_dict"]["w"])
    assert full["state_dict"]["b"].dtype == torch.bfloat16
    assert full["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.99)


# -- 7. a code-running pickle is UnsafeCheckpointError whatever torch's wording -----------------


def test_a_pickle_calling_os_system_is_unsafe_not_corrupt(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save({"state_dict": {"w": torch.zeros(2)}, "x": Armed(str(marker))}, "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="mkdir"):
        mgr.load("evil.ckpt")
    assert not marker.exists()


def test_unsafe_does_not_depend_on_torchs_wording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    mgr = CheckpointManager(str(tmp_path / "ck"))
    mgr.save({"x": Armed(str(marker))}, "evil.ckpt")
    real_load = torch.load

    def reworded(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError("something torch says in some future version") from None

    monkeypatch.setattr(torch, "load", reworded)
    with pytest.raises(UnsafeCheckpointError):
        mgr.load("evil.ckpt")
    assert not marker.exists()


def test_a_damaged_pickle_stays_corrupt_not_unsafe(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "ck" / "junk.ckpt"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("junk/data.pkl", b"\x80\x02}q\x00(X\x01\x00\x00\x00a")  # cut short
        z.writestr("junk/version", b"3\n")
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError) as info:
        CheckpointManager(str(tmp_path / "ck")).load("junk.ckpt")
    assert not isinstance(info.value, UnsafeCheckpointError)


# -- 3. encryption downgrade -----------------------------------------------------------------------


def downgraded(tmp_path: Path) -> CheckpointManager:
    """An encrypted run whose newest checkpoint an attacker replaced by plaintext, re-hashed."""
    mgr = CheckpointManager(str(tmp_path / "run"), encryptor=Encryptor(KEY))
    mgr.save({"w": torch.zeros(3)}, "a.ckpt", global_step=1)
    mgr.save({"w": torch.ones(3)}, "b.ckpt", global_step=2)
    plain = CheckpointManager(str(tmp_path / "run"))
    plain.save({"w": torch.full((3,), 666.0)}, "b.ckpt", global_step=2)  # no extra.encryption
    return mgr


def test_an_encryption_downgrade_is_refused(tmp_path: Path) -> None:
    mgr = downgraded(tmp_path)
    with pytest.raises(TamperedCheckpointError, match="not encrypted") as info:
        mgr.load("b.ckpt")
    assert isinstance(info.value, CorruptCheckpointError)
    with pytest.warns(CheckpointWarning, match="not encrypted"):
        assert mgr.latest().name == "a.ckpt"


def test_plaintext_is_accepted_when_explicitly_allowed(tmp_path: Path) -> None:
    downgraded(tmp_path)
    mgr = CheckpointManager(str(tmp_path / "run"), encryptor=Encryptor(KEY, allow_plaintext=True))
    assert torch.equal(mgr.load("b.ckpt")["w"], torch.full((3,), 666.0))
    assert torch.equal(mgr.load("a.ckpt")["w"], torch.zeros(3))


def test_a_plain_file_without_manifest_is_refused_under_an_encryptor(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "run" / "x.ckpt")
    with pytest.raises(TamperedCheckpointError, match="not encrypted"):
        CheckpointManager(str(tmp_path / "run"), encryptor=Encryptor(KEY)).load("x.ckpt")


# -- 5. one junk manifest blocks no one --------------------------------------------------------------


def edit_manifest(path: Path, edit: Any) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


JUNK: dict[str, Any] = {
    "global_step is a string": lambda r: r.update(global_step="99"),
    "owner is a list": lambda r: r.update(owner=["a"]),
    "extra is a list": lambda r: r.update(extra=[1, 2]),
    "created is 1e20": lambda r: r.update(created=1e20),
    "size is negative": lambda r: r.update(size=-1),
    "size is 10 PB": lambda r: r.update(size=10 * 10**15),
    "size is a bool": lambda r: r.update(size=True),
    "epoch is a float": lambda r: r.update(epoch=1.5),
    "metrics hold a string": lambda r: r.update(metrics={"loss": "low"}),
    "mode is odd": lambda r: r.update(mode="sideways"),
    "digest is not hex": lambda r: r.update(digest="z" * 32),
    "digest is too short": lambda r: r.update(digest="0" * 31),
    "digest_algorithm is unknown": lambda r: r.update(digest_algorithm="md5"),
    "digest_algorithm is missing": lambda r: r.pop("digest_algorithm"),
    "name is a number": lambda r: r.update(name=7),
    "versions is a string": lambda r: r.update(versions="1.0"),
    "encryption record is junk": lambda r: r["extra"].update(encryption={"alg": [], "chunk": "big"}),
    "format_version is a bool": lambda r: r.update(format_version=True),
    "payload is another checkpoint's version": lambda r: r.update(payload="a.ckpt~lckpt-0123456789abcdef"),
    "payload token is not hex": lambda r: r.update(payload="c.ckpt~lckpt-" + "z" * 16),
    "a traversing files entry": lambda r: r.update(
        format_version=2, files={"../../../../etc/hostname": {"size": 1, "sha256": "0" * 64}}),
}


@pytest.fixture
def run(tmp_path: Path) -> CheckpointManager:
    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save({"w": torch.zeros(2)}, "a.ckpt", global_step=1, owner="me")
    mgr.save({"w": torch.ones(2)}, "b.ckpt", global_step=2, owner="me")
    mgr.save({"w": torch.full((2,), 3.0)}, "c.ckpt", global_step=3, owner="me")
    return mgr


def junk_c(mgr: CheckpointManager, edit: Any) -> Path:
    path = Path(mgr.storage.path(manifest_name("c.ckpt")))
    edit_manifest(path, edit)
    return path


def test_a_junk_manifest_is_skipped_everywhere(run: CheckpointManager, capsys, case: str) -> None:
    junk_c(run, JUNK[case])
    check_skipped_everywhere(run, capsys)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(JUNK))


def check_skipped_everywhere(run: CheckpointManager, capsys: pytest.CaptureFixture[str], parses: bool = False) -> None:
    if not parses:  # else only the payload shows that the manifest does not describe it
        with pytest.raises(CorruptCheckpointError):
            run.read_manifest("c.ckpt")
    with pytest.raises(CorruptCheckpointError):
        run.load("c.ckpt")
    with pytest.warns(CheckpointWarning, match="c.ckpt"):
        assert run.latest().name == "b.ckpt"
    with pytest.warns(CheckpointWarning, match="c.ckpt"):
        assert [m.name for m in run.manifests()] == ["a.ckpt", "b.ckpt"]
    with pytest.warns(CheckpointWarning):
        assert run.prune(KeepLatest(1), owner="me", dry_run=True) == ["a.ckpt"]
    for argv in (["ls", run.url], ["ls", run.url, "--json"], ["verify", run.url], ["prune", run.url, "--keep-last", "5"],
                 ["verify", run.url_of("c.ckpt")], ["inspect", run.url_of("c.ckpt")]):
        code, out, err = cli(capsys, *argv)
        assert "Traceback" not in out + err, argv
        assert code in (0, 1), (argv, out, err)
        assert "c.ckpt" in out + err, argv
    assert Path(run.storage.path("c.ckpt")).exists()  # skipped, never deleted


def test_a_deeply_nested_manifest_is_corrupt(run: CheckpointManager, capsys) -> None:
    path = Path(run.storage.path(manifest_name("c.ckpt")))
    raw = path.read_text()
    path.write_text(raw[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}")
    check_skipped_everywhere(run, capsys)


def test_an_oversized_manifest_is_corrupt_without_being_read_whole(run: CheckpointManager, capsys) -> None:
    path = Path(run.storage.path(manifest_name("c.ckpt")))
    raw = path.read_text()
    path.write_text(raw[:-1] + ', "pad": "' + "x" * (80 * 2**20) + '"}')
    check_skipped_everywhere(run, capsys)


@pytest.mark.parametrize("text", ['"global_step": ' + "9" * 5000, '"size": 1e400', '"epoch": NaN', '"owner": "\\ud800"'])
def test_pathological_json_numbers_and_strings_are_corrupt(run: CheckpointManager, capsys, text: str) -> None:
    path = Path(run.storage.path(manifest_name("c.ckpt")))
    path.write_text(path.read_text()[:-1] + ", " + text + "}")
    check_skipped_everywhere(run, capsys)


def test_a_junk_signature_key_id_is_skipped(tmp_path: Path, capsys) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"), signer=Signer(KEY))
    for step, name in enumerate(("a.ckpt", "b.ckpt", "c.ckpt"), 1):
        mgr.save({"w": torch.zeros(2)}, name, global_step=step, owner="me")
    junk_c(mgr, lambda r: r["signature"].update(key_id=["x"]))
    with pytest.raises(CorruptCheckpointError):
        mgr.read_manifest("c.ckpt")
    with pytest.warns(CheckpointWarning, match="c.ckpt"):
        assert mgr.latest().name == "b.ckpt"


def test_a_directory_with_a_single_file_manifest_is_skipped(run: CheckpointManager, capsys) -> None:
    os.remove(run.storage.path("c.ckpt"))
    os.mkdir(run.storage.path("c.ckpt"))
    Path(run.storage.path("c.ckpt"), "x").write_bytes(b"x")
    check_skipped_everywhere(run, capsys, parses=True)


def test_a_file_with_a_sharded_manifest_is_skipped(run: CheckpointManager, capsys) -> None:
    junk_c(run, lambda r: r.update(format_version=2, files={"x": {"size": 1, "sha256": "0" * 64}}))
    check_skipped_everywhere(run, capsys)


def test_a_remote_size_claim_is_checked_before_downloading(capsys) -> None:
    import uuid

    mgr = CheckpointManager(f"memory://hostile-{uuid.uuid4().hex}")
    mgr.save({"w": torch.zeros(2)}, "a.ckpt", global_step=1)
    mgr.save({"w": torch.zeros(2)}, "b.ckpt", global_step=2)
    raw = json.loads(mgr.storage.read_bytes(manifest_name("b.ckpt")))
    raw["size"] = 2**49  # 512 TiB: in range, but not what the store holds
    mgr.storage.write_bytes(manifest_name("b.ckpt"), json.dumps(raw).encode())
    with pytest.raises(CorruptCheckpointError, match="bytes"):
        mgr.verify("b.ckpt")
    with pytest.warns(CheckpointWarning, match="b.ckpt"):
        assert mgr.latest().name == "a.ckpt"


# -- 6. special files are never read -----------------------------------------------------------------


def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "lightning_ckpt.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_a_checkpoint_does_not_hang_anyone(run: CheckpointManager) -> None:
    os.mkfifo(run.storage.path("x.ckpt"))
    os.remove(run.storage.path("c.ckpt"))
    os.mkfifo(run.storage.path("c.ckpt"))  # with a manifest: looks committed
    os.mkfifo(run.storage.path(manifest_name("y.ckpt")))
    Path(run.storage.path("y.ckpt")).write_bytes(b"y")
    for argv in (["verify", run.url], ["verify", run.url_of("x.ckpt")], ["verify", run.url_of("c.ckpt")],
                 ["inspect", run.url_of("x.ckpt")], ["ls", run.url, "--verify"]):
        done = run_cli(*argv)
        assert done.returncode == 1, (argv, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        run.load("c.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run.latest().name == "b.ckpt"


# -- 9. the command line never tracebacks -----------------------------------------------------------


def test_inspect_of_an_odd_optimizer_structure(tmp_path: Path, capsys) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    odd = {"state_dict": {"w": torch.zeros(2)}, "optimizer_states": [{"state": [1, 2], "param_groups": 7}],
           "lr_schedulers": [3], "epoch": "x"}
    mgr.save(odd, "odd.ckpt", weights_only=True)
    code, out, err = cli(capsys, "inspect", mgr.url_of("odd.ckpt"))
    assert "Traceback" not in out + err
    assert code == 0, err


def test_a_cli_command_never_tracebacks_on_an_unexpected_error(tmp_path: Path, capsys, monkeypatch) -> None:
    import lightning_ckpt.cli as cli_module

    def boom(*args: Any) -> int:
        raise TypeError("something nobody foresaw")

    monkeypatch.setattr(cli_module, "cmd_ls", boom)
    parser = cli_module.build_parser
    monkeypatch.setattr(cli_module, "build_parser", lambda: _with_ls(parser(), boom))
    code, out, err = cli(capsys, "ls", str(tmp_path))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:") and "something nobody foresaw" in err


def _with_ls(parser: Any, func: Any) -> Any:
    for action in parser._subparsers._group_actions:
        action.choices["ls"].set_defaults(func=func)
    return parser


# -- 2. a wrong signing key is a loud, typed error, never a fresh start --------------------------------


def signed_run(tmp_path: Path, signer: Signer | None) -> CheckpointManager:
    mgr = CheckpointManager(str(tmp_path / "run"), signer=signer)
    mgr.save({"w": torch.zeros(2)}, "a.ckpt", global_step=1, metrics={"loss": 0.5}, monitor="loss", owner="me")
    mgr.save({"w": torch.ones(2)}, "b.ckpt", global_step=2, metrics={"loss": 0.4}, monitor="loss", owner="me")
    return mgr


@pytest.mark.parametrize("old", ["other key", "unsigned"])
def test_last_and_best_refuse_when_no_checkpoint_verifies_under_the_keys(tmp_path: Path, old: str) -> None:
    from lightning_ckpt import KeyMissingError

    signed_run(tmp_path, Signer(OTHER_KEY) if old == "other key" else None)
    mgr = CheckpointManager(str(tmp_path / "run"), signer=Signer(KEY))
    seen = Signer(OTHER_KEY).key_id if old == "other key" else "unsigned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        for resolve in (mgr.latest, lambda: mgr.best("loss")):
            with pytest.raises(KeyMissingError, match=seen) as info:
                resolve()
            assert Signer(KEY).key_id in str(info.value)
    # with the old key added (a rotation), it resumes
    rotated = CheckpointManager(str(tmp_path / "run"), signer=Signer(KEY, OTHER_KEY))
    if old == "other key":
        assert rotated.latest().name == "b.ckpt"


def test_an_empty_run_is_still_no_checkpoint_yet(tmp_path: Path) -> None:
    assert CheckpointManager(str(tmp_path / "run"), signer=Signer(KEY)).latest() is None


def test_turning_encryption_on_for_an_existing_run_refuses_last(tmp_path: Path) -> None:
    from lightning_ckpt import KeyMissingError

    signed_run(tmp_path, None)
    mgr = CheckpointManager(str(tmp_path / "run"), encryptor=Encryptor(KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(KeyMissingError, match="unencrypted"):
            mgr.latest()
    allowed = CheckpointManager(str(tmp_path / "run"), encryptor=Encryptor(KEY, allow_plaintext=True))
    assert allowed.latest().name == "b.ckpt"


def test_resuming_with_a_wrong_key_overwrites_nothing(tmp_path: Path) -> None:
    from helpers import fit

    from lightning_ckpt import CheckpointCallback, KeyMissingError

    fit(CheckpointCallback(dirpath=str(tmp_path / "run"), save_last=True, monitor="val_loss",
                           signer=Signer(OTHER_KEY)), max_epochs=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    cb = CheckpointCallback(dirpath=str(tmp_path / "run"), save_last=True, monitor="val_loss", signer=Signer(KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        with pytest.raises(KeyMissingError, match=Signer(OTHER_KEY).key_id):
            fit(cb, max_epochs=2, ckpt_path="last")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


# -- 4. a preemption fallback checkpoint belongs to its run ----------------------------------------


def fallback_from(tmp_path: Path, run: str, identity: dict[str, Any] | None) -> None:
    """Run ``run`` for one epoch, then plant its last checkpoint in the shared fallback directory as
    a preemption save at step 999 (with ``identity`` as its run record, if any)."""
    from helpers import fit

    from lightning_ckpt import CheckpointCallback

    fit(CheckpointCallback(dirpath=str(tmp_path / run), save_last=True), max_epochs=1)
    payload = CheckpointManager(str(tmp_path / run)).load("last.ckpt", weights_only=False)
    payload["global_step"] = 999
    extra = {"preempted_by": "SIGTERM", "plan": "fallback", **({"run": identity} if identity else {})}
    CheckpointManager(str(tmp_path / "shared")).save(payload, "preempted.ckpt", global_step=999, epoch=0, extra=extra)


@pytest.mark.parametrize("identity", ["another run", "no identity (older version)"])
def test_a_new_run_never_resumes_another_runs_fallback_checkpoint(tmp_path: Path, identity: str) -> None:
    from helpers import fit

    from lightning_ckpt import CheckpointCallback
    from lightning_ckpt.preemption import Preemption

    old = str(tmp_path / "old")
    fallback_from(tmp_path, "old", {"dirpath": old} if identity == "another run" else None)
    cb = CheckpointCallback(dirpath=str(tmp_path / "new"), save_last=True,
                            preemption=Preemption(fallback_dirpath=str(tmp_path / "shared")))
    with pytest.warns(CheckpointWarning, match="another run"):
        trainer, _ = fit(cb, max_epochs=1, ckpt_path="last")
    assert cb.resumed_from in (None, "") and trainer.global_step == 8  # started fresh, as a new run must


def test_a_run_resumes_its_own_fallback_checkpoint(tmp_path: Path) -> None:
    from helpers import fit

    from lightning_ckpt import CheckpointCallback
    from lightning_ckpt.preemption import Preemption

    fallback_from(tmp_path, "run", {"dirpath": CheckpointManager(str(tmp_path / "run")).url})
    cb = CheckpointCallback(dirpath=str(tmp_path / "run"), save_last=True,
                            preemption=Preemption(fallback_dirpath=str(tmp_path / "shared")))
    fit(cb, max_epochs=2, ckpt_path="last")
    assert cb.resumed_from.endswith("shared/preempted.ckpt")


# -- found hunting the same class of bug: meta.pt, the other pickle of a sharded checkpoint ---------


@pytest.mark.parametrize("content", ["armed", "junk"])
def test_a_forged_meta_pt_is_refused_like_a_payload(tmp_path: Path, content: str, capsys) -> None:
    import io as _io

    from lightning_ckpt.sharded import META_FILE

    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    marker = tmp_path / "pwned"
    buffer = _io.BytesIO()
    torch.save({"epoch": 0, "x": Armed(str(marker))}, buffer)
    (tmp_path / "run" / "s.ckpt" / META_FILE).write_bytes(buffer.getvalue() if content == "armed" else b"PK\x03\x04junk")
    rehash(mgr, "s.ckpt")
    expected = UnsafeCheckpointError if content == "armed" else CorruptCheckpointError
    with pytest.raises(expected, match=META_FILE):
        consolidate(mgr, "s.ckpt")
    with pytest.raises(expected, match=META_FILE):
        ShardedCheckpointer(mgr).load("s.ckpt", model())
    code, out, err = cli(capsys, "inspect", mgr.url_of("s.ckpt"))
    assert code == 1 and "unexpected" not in err and "Traceback" not in out + err
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_dcp_metadata_does_not_hang_a_load(tmp_path: Path) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    (tmp_path / "run" / manifest_name("s.ckpt")).unlink()  # unverified: a directory Lightning wrote
    os.remove(tmp_path / "run" / "s.ckpt" / ".metadata")
    os.mkfifo(tmp_path / "run" / "s.ckpt" / ".metadata")
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError, match="not a regular file"):
        ShardedCheckpointer(mgr).load("s.ckpt", model())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.timeout(60)
def test_a_fifo_as_a_shard_file_does_not_hang_an_unverified_consolidate(tmp_path: Path) -> None:
    from lightning_ckpt.sharded import consolidate

    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    shard = next(p for p in (tmp_path / "run" / "s.ckpt").iterdir() if p.name.endswith(".distcp"))
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        consolidate(mgr, "s.ckpt", verify=False)  # verification off: still never opens a FIFO


# -- attack pass: a manifest we write is always one we read -------------------------------------------


@pytest.mark.parametrize("fields", [{"epoch": -1}, {"metrics": {"loss": "low"}}, {"owner": ["x"]},
                                    {"extra": {"deep": json.loads("[" * 40 + "]" * 40)}}])
def test_a_save_with_fields_no_reader_accepts_is_refused_up_front(tmp_path: Path, fields: dict[str, Any]) -> None:
    from lightning_ckpt import ConfigurationError

    mgr = CheckpointManager(str(tmp_path / "run"))
    mgr.save({"w": torch.zeros(2)}, "a.ckpt", global_step=1)
    with pytest.raises(ConfigurationError, match="manifest"):
        mgr.save({"w": torch.ones(2)}, "a.ckpt", global_step=2, **fields)
    assert mgr.latest().global_step == 1  # the committed one is untouched


def test_a_junk_shard_behind_a_rehashed_manifest_is_corrupt_in_the_cli(tmp_path: Path, capsys) -> None:
    mgr = CheckpointManager(str(tmp_path / "run"))
    sharded(mgr, "s.ckpt")
    shard = next((tmp_path / "run" / "s.ckpt").glob("*.distcp"))
    shard.write_bytes(b"\x00" * 7)
    rehash(mgr, "s.ckpt")
    with pytest.raises(CorruptCheckpointError):
        consolidate(mgr, "s.ckpt")
    for argv in (["inspect", mgr.url_of("s.ckpt")], ["export", mgr.url_of("s.ckpt"), "-o", str(tmp_path / "w.st")]):
        code, out, err = cli(capsys, *argv)
        assert code == 1 and "Traceback" not in out + err and "unexpected" not in err, (argv, out, err)


def test_an_empty_manifest_is_skipped_on_every_backend(backend) -> None:  # noqa: F811
    url, options = backend
    mgr = CheckpointManager(url + "/run", options)
    mgr.save({"w": torch.zeros(2)}, "a.ckpt", global_step=1)
    mgr.save({"w": torch.zeros(2)}, "b.ckpt", global_step=2)
    mgr.storage.write_bytes(manifest_name("b.ckpt"), b"")  # a ranged read of it is "not satisfiable" remotely
    with pytest.warns(CheckpointWarning, match="b.ckpt"):
        assert mgr.latest().name == "a.ckpt"
    with pytest.raises(CorruptCheckpointError):
        mgr.read_manifest("b.ckpt")
