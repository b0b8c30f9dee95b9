"""The ``lightning-ckpt`` command line over real run directories, healthy and damaged.

Runs are written with ``CheckpointManager.save`` (Lightning-shaped dicts, no Trainer) into a local
directory and into ``memory://``; damage is done through :class:`Storage` so it works on both.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from typing import Any

import fsspec
import pytest
import torch
from checkpoints import flip_byte, leave_pending, truncate
from safetensors import safe_open
from safetensors.torch import load, load_file

from lightning_ckpt import CheckpointManager, Storage
from lightning_ckpt.cli import main
from lightning_ckpt.cli.parser import _storage_option
from lightning_ckpt.integrity import manifest_name
from lightning_ckpt.security import Encryptor, Signer, key_id

OWNER = "CheckpointCallback{monitor=val_loss,mode=min,filename=None}"
LOSSES = [0.9, 0.4, 0.6, 0.5]  # the best is epoch 1, neither the first nor the newest
NAMES = [f"epoch={e}-step={8 * (e + 1)}.ckpt" for e in range(len(LOSSES))]
ANSI = re.compile(r"\x1b\[")


def lightning_dict(epoch: int, step: int, seed: int | None = None) -> dict[str, Any]:
    """What Trainer.save_checkpoint writes, in miniature."""
    g = torch.Generator().manual_seed(epoch if seed is None else seed)
    weights = {
        "net.0.weight": torch.randn(8, 4, generator=g),
        "net.0.bias": torch.randn(8, generator=g),
        "net.2.weight": torch.randn(1, 8, generator=g),
        "net.2.bias": torch.randn(1, generator=g),
        "bn.num_batches_tracked": torch.tensor(step),
    }
    params = [k for k in weights if "num_batches" not in k]
    state = {
        i: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(weights[k]) + epoch,
            "exp_avg_sq": torch.ones_like(weights[k])}
        for i, k in enumerate(params)
    }  # fmt: skip
    return {
        "epoch": epoch,
        "global_step": step,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": weights,
        "optimizer_states": [{"state": state, "param_groups": [
            {"lr": 0.05 / (epoch + 1), "betas": (0.9, 0.999), "weight_decay": 0.0, "params": list(range(len(params)))}
        ]}],
        "lr_schedulers": [{"step_size": 3, "gamma": 0.5, "last_epoch": epoch, "_last_lr": [0.05 / (epoch + 1)]}],
        "hyper_parameters": {"lr": 0.05, "hidden": 8},
        "hparams_name": "kwargs",
        "loops": {"fit_loop": {}, "validate_loop": {}},
        "callbacks": {"CheckpointCallback{'monitor': 'val_loss', 'mode': 'min'}": {}},
    }


def make_run(url: str, losses: list[float] = LOSSES, last: bool = True, owner: str = OWNER,
             mode: str = "min", signer: Signer | None = None, encryptor: Encryptor | None = None) -> CheckpointManager:
    """One checkpoint per epoch plus ``last.ckpt``, as the callback would leave them."""
    manager = CheckpointManager(url, signer=signer, encryptor=encryptor)
    for epoch, loss in enumerate(losses):
        step = 8 * (epoch + 1)
        manager.save(lightning_dict(epoch, step), NAMES[epoch], epoch=epoch, global_step=step,
                     metrics={"val_loss": loss, "train_loss": 2 * loss}, monitor="val_loss", mode=mode, owner=owner)
    if last:
        manager.copy(NAMES[len(losses) - 1], "last.ckpt", owner=owner + "/last")
    return manager


@pytest.fixture(autouse=True)
def _plain_console(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(params=["local", "memory"])
def run_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A not-yet-existing run directory on a local disk or in ``memory://``."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("memory_dir") + "/run"


@pytest.fixture
def run(run_url: str) -> str:
    make_run(run_url)
    return run_url


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``main(argv)``; return (exit code, stdout, stderr) and check the output is plain."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert not ANSI.search(captured.out + captured.err), "ANSI codes in non-TTY output"
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


# damage ----------------------------------------------------------------------------------------


# flip_byte, truncate and leave_pending: tests/checkpoints.py


def files(url: str) -> set[str]:
    return {f.name for f in Storage(url).list()}


def line_of(output: str, name: str) -> str:
    lines = [line for line in output.splitlines() if name in line]
    assert lines, f"{name} not in:\n{output}"
    return lines[0]


# ls --------------------------------------------------------------------------------------------


def test_ls_table(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, err = cli(capsys, "ls", run)
    assert code == 0, err
    for name in [*NAMES, "last.ckpt"]:
        assert name in out
    best = line_of(out, NAMES[1])
    assert "val_loss=0.4" in best and "★" in best
    assert "★" not in line_of(out, NAMES[0]) and "★" not in line_of(out, "last.ckpt")
    assert re.search(r"\b1\s+16\b", best)  # epoch and step columns
    assert "KiB" in best and "ago" in best
    assert best.rstrip().endswith("-")  # not verified
    assert "leftover" not in out


def test_ls_stars_the_best_not_its_last_copy(capsys: pytest.CaptureFixture[str], run_url: str) -> None:
    make_run(run_url, losses=[0.9, 0.4])  # the newest is the best: last.ckpt is its copy, same score
    rows = json.loads(cli(capsys, "ls", run_url, "--json")[1])
    assert [r["name"] for r in rows if r["best"]] == [NAMES[1]]
    assert CheckpointManager(run_url).best("val_loss").name == NAMES[1]


def test_ls_json(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, _ = cli(capsys, "ls", run, "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == [*NAMES, "last.ckpt"]
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows if r["best"]] == [NAMES[1]]
    assert by_name[NAMES[1]]["score"] == 0.4 and by_name[NAMES[1]]["monitor"] == "val_loss"
    assert by_name[NAMES[2]]["epoch"] == 2 and by_name[NAMES[2]]["global_step"] == 24
    assert all(r["verified"] is None and r["size"] > 0 and r["age_seconds"] >= 0 for r in rows)


def test_ls_verify_names_the_damaged_checkpoint(capsys: pytest.CaptureFixture[str], run: str) -> None:
    flip_byte(run, NAMES[2])
    code, out, _ = cli(capsys, "ls", run, "--verify")
    assert code == 1
    assert "NO:" in line_of(out, NAMES[2]) and "xxh3-128 digest" in out
    assert line_of(out, NAMES[0]).rstrip().endswith("yes")
    rows = json.loads(cli(capsys, "ls", run, "--verify", "--json")[1])
    assert [r["name"] for r in rows if not r["verified"]] == [NAMES[2]]
    assert "xxh3-128 digest" in next(r["problem"] for r in rows if r["name"] == NAMES[2])
    assert {r["digest_algorithm"] for r in rows} == {"xxh3-128"}


def test_ls_notes_leftovers_and_foreign_files(capsys: pytest.CaptureFixture[str], run: str) -> None:
    leave_pending(run)
    Storage(run).delete(manifest_name(NAMES[0]))
    code, out, _ = cli(capsys, "ls", run)
    assert code == 0
    table, notes = out.split("uncommitted leftovers", 1)
    assert "epoch=9-step=80.ckpt" not in table and NAMES[0] not in table
    assert "epoch=9-step=80.ckpt, epoch=9-step=80.ckpt.pending" in notes.splitlines()[0]
    assert f"no manifest): {NAMES[0]}" in notes
    # --json keeps stdout a JSON list; the notes go to stderr
    code, out, err = cli(capsys, "ls", run, "--json")
    assert len(json.loads(out)) == len(NAMES) and "leftovers" in err


def test_ls_monitor_and_mode_override(capsys: pytest.CaptureFixture[str], run: str) -> None:
    rows = json.loads(cli(capsys, "ls", run, "--json", "--mode", "max")[1])
    assert [r["name"] for r in rows if r["best"]] == [NAMES[0]]
    rows = json.loads(cli(capsys, "ls", run, "--json", "--monitor", "train_loss")[1])
    assert [r["name"] for r in rows if r["best"]] == [NAMES[1]]
    assert rows[1]["monitor"] == "train_loss" and rows[1]["score"] == 0.8


def test_ls_mode_is_read_from_the_manifests(capsys: pytest.CaptureFixture[str], run_url: str) -> None:
    make_run(run_url, mode="max")
    rows = json.loads(cli(capsys, "ls", run_url, "--json")[1])
    assert [r["name"] for r in rows if r["best"]] == [NAMES[0]]  # 0.9 is the best under max


def test_ls_empty_and_missing_directories(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    code, out, _ = cli(capsys, "ls", str(tmp_path))
    assert code == 0 and "no committed checkpoints" in out
    code, _, err = cli(capsys, "ls", str(tmp_path / "nope"))
    assert code == 2 and err.startswith("error: no such directory")


def test_ls_of_a_file_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    make_run(str(tmp_path))
    code, _, err = cli(capsys, "ls", str(tmp_path / NAMES[0]))
    assert code == 2 and "is a file" in err and "inspect" in err


def test_unknown_protocol_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ls", "nosuchproto://bucket/run"], ["verify", "nosuchproto://bucket/run/a.ckpt"],
                 ["inspect", "nosuchproto://bucket/a.ckpt"]):  # fmt: skip
        code, _, err = cli(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("error:") and "nosuchproto" in err and len(err.strip().splitlines()) == 1


# inspect ---------------------------------------------------------------------------------------


def test_inspect(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, err = cli(capsys, "inspect", f"{run}/{NAMES[1]}")
    assert code == 0, err
    for text in ["step      16", "val_loss = 0.4", "digest    xxh3-128 ", "verified  yes", "lightning_ckpt",
                 "epoch 1, global_step 16, pytorch-lightning_version 2.6.6", "lr=0.05, hidden=8",
                 "5 tensors", "float32 x4, int64 x1", "net.0.weight  [8, 4]  float32  128 B",
                 "1 param group(s), lr 0.025", "exp_avg, exp_avg_sq, step", "step 16",
                 "betas=[0.9, 0.999]", "step_size=3", "fit_loop, validate_loop", "hparams_name"]:  # fmt: skip
        assert text in out, text


def test_inspect_json(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, _ = cli(capsys, "inspect", f"{run}/{NAMES[2]}", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["verified"] is True and report["error"] is None
    assert report["manifest"]["global_step"] == 24 and len(report["manifest"]["digest"]) == 32
    assert report["manifest"]["digest_algorithm"] == "xxh3-128"
    payload = report["payload"]
    assert payload["lightning"] == {"epoch": 2, "global_step": 24, "pytorch-lightning_version": "2.6.6"}
    assert payload["hyper_parameters"] == {"lr": 0.05, "hidden": 8}
    sd = payload["state_dict"]
    assert sd["count"] == 5 and sd["dtypes"] == {"float32": 4, "int64": 1} and sd["elements"] == 8 * 4 + 8 + 8 + 1 + 1
    assert sd["largest"][0] == {"name": "net.0.weight", "shape": [8, 4], "dtype": "float32", "bytes": 128}
    assert len(sd["largest"]) == 5
    (opt,) = payload["optimizer_states"]
    assert opt["param_groups"] == 1 and opt["lr"] == [pytest.approx(0.05 / 3)] and opt["step"] == 24.0
    assert opt["state_keys"] == ["exp_avg", "exp_avg_sq", "step"] and opt["params_with_state"] == 4
    assert payload["lr_schedulers"][0]["last_epoch"] == 2
    assert payload["loops"] == ["fit_loop", "validate_loop"] and len(payload["callbacks"]) == 1


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_inspect_damaged_exits_1(capsys: pytest.CaptureFixture[str], run: str, damage: Any) -> None:
    damage(run, NAMES[1])
    code, out, _ = cli(capsys, "inspect", f"{run}/{NAMES[1]}")
    assert code == 1
    assert "xxh3-128" in out  # the manifest is still shown
    assert re.search(r"verified\s+NO: .*(xxh3-128 digest|bytes)", out)
    report = json.loads(cli(capsys, "inspect", f"{run}/{NAMES[1]}", "--json")[1])
    assert report["verified"] is False and report["payload"] is None and report["error"]


def test_inspect_uncommitted_and_missing(capsys: pytest.CaptureFixture[str], run: str) -> None:
    leave_pending(run)
    code, _, err = cli(capsys, "inspect", f"{run}/epoch=9-step=80.ckpt")
    assert code == 1 and "never committed" in err
    code, _, err = cli(capsys, "inspect", f"{run}/nope.ckpt")
    assert code == 2 and err.startswith("error: no checkpoint at")


def test_inspect_plain_torch_file(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    """A checkpoint without a manifest (say, from ModelCheckpoint) loads with a warning."""
    torch.save(lightning_dict(3, 32), tmp_path / "plain.ckpt")
    code, out, err = cli(capsys, "inspect", str(tmp_path / "plain.ckpt"))
    assert code == 0
    assert "warning:" in err and "unverified" in err
    assert "manifest  none" in out and "global_step 32" in out


def test_inspect_says_how_many_tensors_it_left_out(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    checkpoint = lightning_dict(0, 8)
    checkpoint["state_dict"]["extra.bias"] = torch.zeros(1, dtype=torch.float16)  # 6 tensors, 5 shown
    torch.save(checkpoint, tmp_path / "six.ckpt")
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "six.ckpt"))
    assert code == 0
    assert "6 tensors" in out
    assert "extra.bias" not in out  # the smallest, left out, and said so
    assert "… 1 more tensor, 2 B" in out


def _junk_pickle(path: Any) -> None:
    path.write_bytes(pickle.dumps({"not": "a checkpoint"}, protocol=4))


def _plain_zip(path: Any) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "a zip, but no torch checkpoint")


def _truncated_zip(path: Any) -> None:
    torch.save(lightning_dict(0, 8), path)
    path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.write_text("notes from a colleague, not a checkpoint\n"), "not a torch checkpoint (neither a zip"),
        (lambda p: p.write_bytes(bytes(range(256)) * 20), "not a torch checkpoint (neither a zip"),
        (_junk_pickle, "a plain pickle, not a torch checkpoint"),
        (_plain_zip, "a zip archive, but not a readable torch checkpoint"),
        (_truncated_zip, "a zip archive cut short"),
    ],
    ids=["text", "binary", "pickle", "zip", "truncated-zip"],
)
def test_inspect_of_a_file_that_is_no_checkpoint_says_what_it_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Any, make: Any, what: str
) -> None:
    make(tmp_path / "junk.ckpt")
    code, out, _ = cli(capsys, "inspect", str(tmp_path / "junk.ckpt"))  # cli() also checks: no traceback
    assert code == 1
    assert re.search(rf"verified\s+NO: junk.ckpt is not a readable checkpoint: {re.escape(what)}", out)
    assert "Weights only load failed" not in out  # torch's boilerplate, no help here


# verify ----------------------------------------------------------------------------------------


def test_verify_healthy(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, _ = cli(capsys, "verify", run)
    assert code == 0
    assert out.splitlines() == [f"ok {n}" for n in [*NAMES, "last.ckpt"]] + ["5 ok, 0 bad"]


def test_verify_names_every_damaged_file(capsys: pytest.CaptureFixture[str], run: str) -> None:
    flip_byte(run, NAMES[0])
    truncate(run, NAMES[1])
    Storage(run).delete(manifest_name(NAMES[2]))
    Storage(run).write_bytes(manifest_name(NAMES[3]), b"{not json")
    leave_pending(run)
    code, out, _ = cli(capsys, "verify", run)
    assert code == 1
    assert line_of(out, NAMES[0]) == f"BAD {NAMES[0]}: {NAMES[0]} does not match the xxh3-128 digest in its manifest (damaged)"
    assert re.fullmatch(rf"BAD {re.escape(NAMES[1])}: .* is 100 bytes; its manifest says \d+ bytes .*",
                        line_of(out, NAMES[1]))  # fmt: skip
    assert line_of(out, NAMES[2]).startswith(f"BAD {NAMES[2]}: no manifest")
    assert line_of(out, NAMES[3]).startswith(f"BAD {NAMES[3]}: manifest of") and "not valid JSON" in out
    assert "BAD epoch=9-step=80.ckpt: uncommitted leftover" in out
    assert "BAD epoch=9-step=80.ckpt.pending: uncommitted leftover" in out
    assert "ok last.ckpt" in out  # a hard link or copy of NAMES[3]'s payload, which is intact
    assert out.splitlines()[-1] == "1 ok, 6 bad"


def test_verify_manifest_without_payload(capsys: pytest.CaptureFixture[str], run: str) -> None:
    Storage(run).delete(NAMES[0])
    code, out, _ = cli(capsys, "verify", run)
    assert code == 1 and f"BAD {NAMES[0]}: its payload is missing" in out


def test_verify_one_file(capsys: pytest.CaptureFixture[str], run: str) -> None:
    assert cli(capsys, "verify", f"{run}/{NAMES[0]}")[:2] == (0, f"ok {NAMES[0]}\n1 ok, 0 bad\n")
    flip_byte(run, NAMES[0])
    code, out, _ = cli(capsys, "verify", f"{run}/{NAMES[0]}")
    assert code == 1 and out.startswith(f"BAD {NAMES[0]}: ") and "xxh3-128 digest" in out
    Storage(run).delete(manifest_name(NAMES[1]))
    code, out, _ = cli(capsys, "verify", f"{run}/{NAMES[1]}")
    assert code == 1 and "has no lightning-ckpt manifest" in out
    code, _, err = cli(capsys, "verify", f"{run}/missing.ckpt")
    assert code == 2 and err.startswith("error: no checkpoint at")


def test_verify_empty_directory_fails(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    code, out, _ = cli(capsys, "verify", str(tmp_path))
    assert code == 1 and "nothing to verify" in out


# diff ------------------------------------------------------------------------------------------


def test_diff(capsys: pytest.CaptureFixture[str], run: str) -> None:
    manager = CheckpointManager(run)
    other = lightning_dict(1, 16)
    other["state_dict"]["net.0.bias"] = other["state_dict"]["net.0.bias"] + 0.5
    other["state_dict"]["net.2.weight"] = torch.zeros(2, 8)
    other["state_dict"]["extra.weight"] = torch.ones(3)
    del other["state_dict"]["net.2.bias"]
    other["epoch"], other["global_step"] = 7, 99
    manager.save(other, "other.ckpt", epoch=7, global_step=99, metrics={"val_loss": 0.1}, monitor="val_loss")
    code, out, _ = cli(capsys, "diff", f"{run}/{NAMES[1]}", f"{run}/other.ckpt")
    assert code == 0  # differences are not a failure
    assert "state_dict: 2 same, 1 added, 1 removed, 1 shape, 1 values" in out
    assert re.search(r"values\s+net\.0\.bias\s+\[8\] float32\s+\[8\] float32\s+0\.5\b", out)
    assert re.search(r"shape\s+net\.2\.weight\s+\[1, 8\] float32\s+\[2, 8\] float32", out)
    assert re.search(r"added\s+extra\.weight\s+-\s+\[3\] float32", out)
    assert re.search(r"removed\s+net\.2\.bias", out)
    assert re.search(r"epoch\s+1\s+7", out) and re.search(r"global_step\s+16\s+99", out)
    assert re.search(r"metrics\.val_loss\s+0\.4\s+0\.1", out)

    report = json.loads(cli(capsys, "diff", f"{run}/{NAMES[1]}", f"{run}/other.ckpt", "--json", "--atol", "1")[1])
    changes = {c["name"]: c for c in report["state_dict"]["changes"]}
    assert set(changes) == {"net.2.weight", "extra.weight", "net.2.bias"}  # 0.5 is within atol 1
    assert report["state_dict"]["same"] == 3
    assert changes["net.2.weight"]["a"] == {"shape": [1, 8], "dtype": "float32"}
    assert {"key": "global_step", "a": 16, "b": 99} in report["metadata"]


def test_diff_between_epochs_includes_optimizer_state(capsys: pytest.CaptureFixture[str], run: str) -> None:
    report = json.loads(cli(capsys, "diff", f"{run}/{NAMES[0]}", f"{run}/{NAMES[1]}", "--json")[1])
    opt = {c["name"]: c for c in report["optimizer_states"]["changes"]}
    assert opt["0.state.0.exp_avg"]["max_abs_diff"] == 1.0  # zeros + epoch
    assert "0.state.0.exp_avg_sq" not in opt  # ones in both
    keys = {m["key"] for m in report["metadata"]}
    assert {"optimizer_states.0.param_groups.0.lr", "lr_schedulers.0.last_epoch", "epoch"} <= keys


def test_diff_identical(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, _ = cli(capsys, "diff", f"{run}/{NAMES[3]}", f"{run}/last.ckpt")
    assert code == 0
    assert "state_dict: 5 same, no differences" in out and "metadata: no differences" in out


def test_diff_damaged_exits_1(capsys: pytest.CaptureFixture[str], run: str) -> None:
    flip_byte(run, NAMES[0])
    code, _, err = cli(capsys, "diff", f"{run}/{NAMES[0]}", f"{run}/{NAMES[1]}")
    assert code == 1 and "xxh3-128 digest" in err and err.startswith("error:")


# prune -----------------------------------------------------------------------------------------


def printed(out: str, verb: str) -> list[str]:
    return [line.removeprefix(verb + " ") for line in out.splitlines() if line.startswith(verb + " ")]


def test_prune_dry_run_then_prune(capsys: pytest.CaptureFixture[str], run: str) -> None:
    before = files(run)
    code, out, _ = cli(capsys, "prune", run, "--keep-last", "1", "--keep-best", "1", "--dry-run")
    assert code == 0
    would = printed(out, "would delete")
    assert would == [NAMES[0], NAMES[2]]  # epoch 1 is the best, epoch 3 the newest
    assert files(run) == before  # a dry run deletes nothing
    code, out, _ = cli(capsys, "prune", run, "--keep-last", "1", "--keep-best", "1")
    assert code == 0
    assert printed(out, "deleted") == would
    gone = {n for name in would for n in (name, manifest_name(name))}
    assert files(run) == before - gone
    assert [m.name for m in CheckpointManager(run).manifests()] == [NAMES[1], NAMES[3], "last.ckpt"]
    assert "kept 3:" in out


def test_prune_keep_best_only_keeps_the_newest_too(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, _ = cli(capsys, "prune", run, "--keep-best", "2")
    assert code == 0
    # the best two are epochs 1 and 3, the newest is 3; last.ckpt is its own owner, kept as its newest
    assert printed(out, "deleted") == [NAMES[0], NAMES[2]]
    code, out, _ = cli(capsys, "prune", run, "--keep-last", "0", "--keep-best", "0")
    assert printed(out, "deleted") == [NAMES[1]]
    # the newest of each owner stays, as when the callback prunes its own files
    assert [m.name for m in CheckpointManager(run).manifests()] == [NAMES[3], "last.ckpt"]


def test_prune_owner(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, out, _ = cli(capsys, "prune", run, "--keep-last", "0", "--owner", OWNER + "/last", "--dry-run")
    assert code == 0 and printed(out, "would delete") == []  # its only file is the newest of its owner
    code, out, _ = cli(capsys, "prune", run, "--keep-last", "1", "--owner", OWNER, "--dry-run")
    assert printed(out, "would delete") == NAMES[:3]


def test_prune_needs_monitor_and_mode(capsys: pytest.CaptureFixture[str], run_url: str) -> None:
    manager = make_run(run_url, owner="mine")
    manager.save({"w": torch.ones(1)}, "x.ckpt", global_step=1000, metrics={"acc": 0.5}, monitor="acc", owner="mine")
    code, _, err = cli(capsys, "prune", run_url, "--keep-best", "1")
    assert code == 2 and "--monitor" in err and "acc, val_loss" in err
    code, _, err = cli(capsys, "prune", run_url, "--keep-best", "1", "--monitor", "val_loss")
    assert code == 2 and "--mode" in err  # owner "mine" records no mode
    code, out, _ = cli(capsys, "prune", run_url, "--keep-best", "1", "--monitor", "val_loss", "--mode", "max",
                       "--dry-run")  # fmt: skip
    assert code == 0 and printed(out, "would delete") == NAMES[1:]  # keeps 0.9 (max) and x.ckpt (newest)


def test_prune_clean_removes_leftovers(capsys: pytest.CaptureFixture[str], run: str) -> None:
    leave_pending(run)
    code, out, _ = cli(capsys, "prune", run, "--clean", "--dry-run")
    assert code == 0 and "would remove leftover epoch=9-step=80.ckpt.pending" in out
    assert "epoch=9-step=80.ckpt" in files(run)
    code, out, _ = cli(capsys, "prune", run, "--clean")
    assert code == 0 and "removed leftover epoch=9-step=80.ckpt" in out
    assert not {"epoch=9-step=80.ckpt", "epoch=9-step=80.ckpt.pending"} & files(run)
    assert len(CheckpointManager(run).manifests()) == 5
    assert "no leftovers" in cli(capsys, "prune", run, "--clean")[1]


def test_prune_without_a_policy_is_a_usage_error(capsys: pytest.CaptureFixture[str], run: str) -> None:
    code, _, err = cli(capsys, "prune", run)
    assert code == 2 and "nothing to do" in err
    assert cli(capsys, "prune", run, "--keep-last", "-1")[0] == 2


# export ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_export_safetensors(capsys: pytest.CaptureFixture[str], run: str, tmp_path: Any, dtype: str) -> None:
    out_file = tmp_path / "model.safetensors"
    code, out, err = cli(capsys, "export", f"{run}/{NAMES[1]}", "--format", "safetensors", "--output",
                         str(out_file), "--dtype", dtype)  # fmt: skip
    assert code == 0, err
    assert "wrote" in out and "5 tensors" in out
    tensors = load_file(str(out_file))
    original = lightning_dict(1, 16)["state_dict"]
    assert set(tensors) == set(original)
    assert tensors["net.0.weight"].dtype == getattr(torch, dtype)
    assert tensors["bn.num_batches_tracked"].dtype == torch.int64  # only floating tensors are cast
    torch.testing.assert_close(tensors["net.0.weight"].float(), original["net.0.weight"], rtol=1e-2, atol=1e-2)
    with safe_open(str(out_file), "pt") as f:
        meta = f.metadata()
    assert meta["epoch"] == "1" and meta["global_step"] == "16" and meta["source"].endswith(NAMES[1])


def test_export_tied_and_view_tensors(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    """safetensors refuses shared storage; the export clones what needs it."""
    shared = torch.randn(4, 4)
    state = {"state_dict": {"emb.weight": shared, "head.weight": shared, "row": shared[1], "t": shared.t()}}
    CheckpointManager(str(tmp_path)).save(state, "tied.ckpt")
    code, _, err = cli(capsys, "export", str(tmp_path / "tied.ckpt"), "-o", str(tmp_path / "w.safetensors"))
    assert code == 0, err
    tensors = load_file(str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(tensors["head.weight"], shared)
    torch.testing.assert_close(tensors["row"], shared[1])
    torch.testing.assert_close(tensors["t"], shared.t())


def test_export_to_a_url_and_plain_state_dict(capsys: pytest.CaptureFixture[str], tmp_path: Any,
                                              memory_dir: str) -> None:
    CheckpointManager(str(tmp_path)).save({"w": torch.ones(2, 2), "b": torch.zeros(2)}, "plain.ckpt")
    target = f"{memory_dir}/export/w.safetensors"
    code, _, err = cli(capsys, "export", str(tmp_path / "plain.ckpt"), "-o", target, "--dtype", "float16")
    assert code == 0, err
    data = fsspec.filesystem("memory").cat_file(target.removeprefix("memory://"))
    tensors = load(data)
    assert set(tensors) == {"w", "b"} and tensors["w"].dtype == torch.float16


def test_export_of_one_tensor_says_one_tensor(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    CheckpointManager(str(tmp_path)).save({"state_dict": {"w": torch.ones(3)}}, "one.ckpt")
    code, out, err = cli(capsys, "export", str(tmp_path / "one.ckpt"), "-o", str(tmp_path / "w.safetensors"))
    assert code == 0, err
    assert ": 1 tensor, 12 B of weights" in out


def test_export_torch_format(capsys: pytest.CaptureFixture[str], run: str, tmp_path: Any) -> None:
    code, _, _ = cli(capsys, "export", f"{run}/{NAMES[0]}", "--format", "torch", "-o", str(tmp_path / "w.pt"))
    assert code == 0
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(weights) == set(lightning_dict(0, 8)["state_dict"])
    assert not [p for p in tmp_path.iterdir() if ".lckpt-tmp-" in p.name]


def test_export_damaged_or_empty(capsys: pytest.CaptureFixture[str], run: str, tmp_path: Any) -> None:
    truncate(run, NAMES[0])
    code, _, err = cli(capsys, "export", f"{run}/{NAMES[0]}", "-o", str(tmp_path / "w.safetensors"))
    assert code == 1 and "bytes" in err and not (tmp_path / "w.safetensors").exists()
    CheckpointManager(run).save({"epoch": 1}, "empty.ckpt")
    code, _, err = cli(capsys, "export", f"{run}/empty.ckpt", "-o", str(tmp_path / "w.safetensors"))
    assert code == 2 and "no tensors" in err


# plan ------------------------------------------------------------------------------------------


def test_plan(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "plan", "--save-seconds", "20", "--every", "30m", "--train-hours", "168",
                       "--mtbf-hours", "24")  # fmt: skip
    assert code == 0
    assert re.search(r"saves\s+336\n", out)
    assert "1.87 h" in out and "1.11 %" in out
    assert "31.0 min (1859 s)" in out
    report = json.loads(cli(capsys, "plan", "--save-seconds", "20s", "--every", "0.5h", "--train-hours", "7d",
                            "--budget", "1", "--json")[1])  # fmt: skip
    assert report["plan"]["saves"] == 336 and report["interval_for_budget_seconds"] == pytest.approx(2000)
    assert report["young_daly"] is None
    code, out, _ = cli(capsys, "plan", "--save-seconds", "20", "--every", "30m", "--train-hours", "168",
                       "--budget", "1")  # fmt: skip
    assert code == 0 and "save every 33.3 min (2000 s)" in out
    assert "CheckpointCallback(overhead_budget=0.01)" in out  # the same idea, measured while training


@pytest.mark.parametrize("bad", [["--every", "0"], ["--every", "soon"], ["--every", "-5m"]])
def test_plan_rejects_bad_durations(capsys: pytest.CaptureFixture[str], bad: list[str]) -> None:
    code, _, err = cli(capsys, "plan", "--save-seconds", "20", "--train-hours", "168", *bad)
    assert code == 2 and "--every" in err


# usage and options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["ls"], ["ls", "a", "b"], ["ls", "x", "--mode", "median"], ["diff", "a"],
     ["export", "a.ckpt"], ["ls", "x", "--storage-option", "novalue"], ["diff", "a", "b", "--atol", "-1"]],
)  # fmt: skip
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "usage:" in err


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("ls", "inspect", "verify", "diff", "prune", "export", "plan"))
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.startswith("lightning-ckpt ")


def test_storage_option_values_are_json_when_they_parse() -> None:
    assert _storage_option("anon=false") == ("anon", False)
    assert _storage_option('client_kwargs={"endpoint_url":"http://127.0.0.1:8333"}') == (
        "client_kwargs", {"endpoint_url": "http://127.0.0.1:8333"})  # fmt: skip
    assert _storage_option("profile=training") == ("profile", "training")
    assert _storage_option("token=a=b") == ("token", "a=b")
    assert _storage_option("retries=3") == ("retries", 3)


def test_storage_options_reach_s3(capsys: pytest.CaptureFixture[str], s3_url: str, s3_server: Any) -> None:
    options = s3_server.storage_options
    CheckpointManager(s3_url, options).save(lightning_dict(0, 8), NAMES[0], epoch=0, global_step=8)
    flags = [a for k, v in options.items() for a in ("--storage-option", f"{k}={json.dumps(v)}")]
    code, out, err = cli(capsys, "verify", s3_url, *flags)
    assert code == 0, err
    assert f"ok {NAMES[0]}" in out
    # global form (before the command) works too; without credentials the server refuses
    code, out, _ = cli(capsys, *flags, "ls", s3_url, "--json")
    assert code == 0 and json.loads(out)[0]["name"] == NAMES[0]
    code, _, err = cli(capsys, "ls", s3_url, "--storage-option",
                       f"client_kwargs={json.dumps(options['client_kwargs'])}", "--storage-option", "anon=true")
    assert code == 2 and err.startswith("error:")


def test_console_entry_point(tmp_path: Any) -> None:
    make_run(str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "lightning_ckpt.cli", "ls", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert NAMES[1] in result.stdout and "★" in result.stdout and not ANSI.search(result.stdout)
    result = subprocess.run([sys.executable, "-m", "lightning_ckpt.cli", "verify", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr


# keys: signed and encrypted runs ---------------------------------------------------------------

SIGN_KEY, ENC_KEY, OTHER_KEY = "ab" * 32, "cd" * 32, "ef" * 32


@pytest.fixture
def keys(tmp_path: Any) -> dict[str, str]:
    """Key files as a user keeps them: 64 hex digits and a newline."""
    paths = {}
    for label, key in (("sign", SIGN_KEY), ("enc", ENC_KEY), ("other", OTHER_KEY)):
        path = tmp_path / f"{label}.key"
        path.write_text(key + "\n")
        paths[label] = str(path)
    return paths


@pytest.fixture
def secure_run(run_url: str) -> str:
    """A run saved with CheckpointCallback(signer=..., encryptor=...)'s manager settings."""
    make_run(run_url, signer=Signer(bytes.fromhex(SIGN_KEY)), encryptor=Encryptor(bytes.fromhex(ENC_KEY)))
    return run_url


def tamper_manifest(url: str, name: str) -> None:
    """Make a worse checkpoint look like the best one: edit its manifest, keep its signature."""
    storage = Storage(url)
    raw = json.loads(storage.read_bytes(manifest_name(name)))
    raw["metrics"]["val_loss"] = 0.01
    storage.write_bytes(manifest_name(name), json.dumps(raw).encode())


def test_verify_checks_signatures_with_the_signing_key(capsys: pytest.CaptureFixture[str], secure_run: str,
                                                       keys: dict[str, str]) -> None:
    code, out, err = cli(capsys, "verify", secure_run, "--signing-key-file", keys["sign"])
    assert code == 0, err
    assert "5 ok, 0 bad" in out
    tamper_manifest(secure_run, NAMES[2])
    code, out, _ = cli(capsys, "verify", secure_run, "--signing-key-file", keys["sign"])
    assert code == 1
    assert f"BAD {NAMES[2]}: the signature of the manifest of {NAMES[2]} does not match its manifest (tampered)" in out
    code, out, _ = cli(capsys, "verify", f"{secure_run}/{NAMES[2]}", "--signing-key-file", keys["sign"])
    assert code == 1 and f"BAD {NAMES[2]}" in out and "tampered" in out
    # without the key only sizes and digests are checked: the edited manifest goes unnoticed
    code, out, _ = cli(capsys, "verify", secure_run)
    assert code == 0


def test_verify_with_the_wrong_signing_key_names_both_key_ids(capsys: pytest.CaptureFixture[str], secure_run: str,
                                                              keys: dict[str, str]) -> None:
    code, out, _ = cli(capsys, "verify", secure_run, "--signing-key-file", keys["other"])
    assert code == 1 and "0 ok, 5 bad" in out
    signed_with, configured = key_id(bytes.fromhex(SIGN_KEY)), key_id(bytes.fromhex(OTHER_KEY))
    assert f"signed with key '{signed_with}', not one of the configured keys ['{configured}']" in out
    # rotation: the new key first, the old one still accepted
    code, out, _ = cli(capsys, "verify", secure_run, "--signing-key-file", keys["other"],
                       "--signing-key-file", keys["sign"])
    assert code == 0 and "5 ok, 0 bad" in out


def test_ls_and_prune_with_a_signing_key_leave_unsigned_manifests_out(
    capsys: pytest.CaptureFixture[str], secure_run: str, keys: dict[str, str]
) -> None:
    tamper_manifest(secure_run, NAMES[2])
    code, out, _ = cli(capsys, "ls", secure_run, "--json", "--signing-key-file", keys["sign"])
    assert code == 0 and NAMES[2] not in {row["name"] for row in json.loads(out)}
    code, out, _ = cli(capsys, "ls", secure_run, "--signing-key-file", keys["sign"])
    assert f"unreadable: {NAMES[2]}: the signature of the manifest of {NAMES[2]}" in out
    # prune never deletes (nor trusts the score of) what it cannot authenticate
    code, out, err = cli(capsys, "prune", secure_run, "--keep-best", "1", "--signing-key-file", keys["sign"])
    assert code == 0, err
    assert NAMES[2] in files(secure_run) and f"deleted {NAMES[0]}" in out and f"deleted {NAMES[2]}" not in out
    assert "warning: skipping" in err


def test_inspect_diff_export_decrypt_with_the_encryption_key(capsys: pytest.CaptureFixture[str], secure_run: str,
                                                             keys: dict[str, str], tmp_path: Any) -> None:
    enc = ("--encryption-key-file", keys["enc"])
    code, out, err = cli(capsys, "inspect", f"{secure_run}/{NAMES[1]}", *enc, "--signing-key-file", keys["sign"])
    assert code == 0, err
    assert f"encrypted  AES-256-GCM, key id {key_id(bytes.fromhex(ENC_KEY))}" in out
    assert "signature  valid" in out and "state_dict" in out
    code, out, err = cli(capsys, "diff", f"{secure_run}/{NAMES[0]}", f"{secure_run}/{NAMES[1]}", *enc, "--json")
    assert code == 0, err
    assert json.loads(out)["state_dict"]["same"] == 0
    target = tmp_path / "w.safetensors"
    code, _, err = cli(capsys, "export", f"{secure_run}/{NAMES[1]}", "-o", str(target), *enc)
    assert code == 0, err
    assert torch.equal(load_file(str(target))["net.0.weight"], lightning_dict(1, 16)["state_dict"]["net.0.weight"])


def test_encryption_key_from_a_named_environment_variable(capsys: pytest.CaptureFixture[str], secure_run: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_RUN_KEY", ENC_KEY)
    code, out, err = cli(capsys, "inspect", f"{secure_run}/{NAMES[1]}", "--json", "--encryption-key-env", "MY_RUN_KEY")
    assert code == 0, err
    assert json.loads(out)["payload"]["lightning"]["global_step"] == 16
    monkeypatch.delenv("MY_RUN_KEY")
    code, _, err = cli(capsys, "inspect", f"{secure_run}/{NAMES[1]}", "--encryption-key-env", "MY_RUN_KEY")
    assert code == 2 and "MY_RUN_KEY" in err and "is not set" in err


def test_a_missing_encryption_key_is_a_usage_error_that_says_what_to_give(
    capsys: pytest.CaptureFixture[str], secure_run: str, keys: dict[str, str], tmp_path: Any
) -> None:
    url = f"{secure_run}/{NAMES[1]}"
    hint = "give its key with --encryption-key-file PATH or --encryption-key-env NAME"
    # inspect still shows the manifest, and the stored bytes verify without the key
    code, out, err = cli(capsys, "inspect", url)
    assert code == 2 and "verified   yes" in out and "payload" not in out
    assert err.startswith("error:") and hint in err
    for argv in (["diff", url, f"{secure_run}/{NAMES[0]}"], ["export", url, "-o", str(tmp_path / "w.safetensors")]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and hint in err, argv
    code, _, err = cli(capsys, "inspect", url, "--encryption-key-file", keys["other"])
    assert code == 2 and f"encrypted with key '{key_id(bytes.fromhex(ENC_KEY))}'" in err
    # listing and verifying need no key: the manifest records the stored (encrypted) bytes
    assert cli(capsys, "verify", secure_run)[0] == 0 and cli(capsys, "ls", secure_run, "--verify")[0] == 0


def test_bad_key_files_are_usage_errors(capsys: pytest.CaptureFixture[str], secure_run: str, tmp_path: Any) -> None:
    short = tmp_path / "short.key"
    short.write_text("abcd\n")
    code, _, err = cli(capsys, "verify", secure_run, "--signing-key-file", str(tmp_path / "nope.key"))
    assert code == 2 and "cannot read key file" in err
    code, _, err = cli(capsys, "inspect", f"{secure_run}/{NAMES[1]}", "--encryption-key-file", str(short))
    assert code == 2 and "must be 32 bytes" in err


def test_no_option_takes_a_key_itself() -> None:
    """Keys only ever come from files or named variables (a key on the command line leaks to ps)."""
    from lightning_ckpt.cli import build_parser

    options = {o for a in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
               for action in a._actions for o in action.option_strings}
    assert {o for o in options if "key" in o} == {"--signing-key-file", "--signing-key-env",
                                                  "--encryption-key-file", "--encryption-key-env"}

