"""The console examples of README.md and docs/ are run, and their output must keep its shape.

Every ```console block is a session: ``$ command`` lines, each followed by the output it printed
and ``# exit N``. The commands run in document order (``prune`` changes what later blocks see) in
a directory built the way the docs say theirs was: ``runs/demo`` from four epochs of a small model
with ``CheckpointCallback(dirpath="runs/demo", monitor="val_loss", save_top_k=3, save_last=True)``;
``runs/damaged``, a copy with one payload truncated, a byte flipped in another and a save killed
before its manifest; ``runs/secure``, three epochs saved with a signer and an encryptor, one
manifest edited afterwards. ``lightning-ckpt`` runs in-process (fast, same code as the entry
point); a ``python -c`` script runs in-process too, reading the previous command's stdout.

"Shape" is the output with what legitimately varies between runs masked: numbers, digests and key
ids, ages, versions, the directory the docs ran in (``/tmp/lcdemo``), the width of table rules and
of column padding. Everything else must match line for line (a ``...`` line in the docs stands for
any lines), and so must the exit code. Blocks that need what a test cannot build cheaply are listed
in ``NOT_RUN`` with the reason, so that a new block cannot slip through unchecked.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import fit

from lightning_ckpt import CheckpointCallback
from lightning_ckpt.cli import main
from lightning_ckpt.security import Encryptor, Signer

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
#: (document, first command of the block) -> why it is not run here
NOT_RUN = {
    ("docs/cli.md", "lightning-ckpt ls /tmp/fs/ck"): "needs a 2-process FSDP2 run (tests/test_distributed.py runs those)",
}
#: where the documented sessions ran; masked on both sides
DOC_ROOTS = ("/tmp/lcdemo2", "/tmp/lcdemo")
SIGN_KEY, ENC_KEY = "5a" * 32, "c3" * 32


# ------------------------------------------------------------------------------ parsing


@dataclass
class Command:
    line: str  # without the "$ "
    expected: list[str] = field(default_factory=list)
    exit: int | None = None


@dataclass
class Block:
    document: str
    lineno: int
    commands: list[Command]

    @property
    def id(self) -> str:
        return f"{self.document}:{self.lineno}"


def console_blocks(document: str) -> list[Block]:
    blocks, current, start = [], None, 0
    for lineno, line in enumerate((REPO / document).read_text().splitlines(), 1):
        if current is None:
            if line.strip() == "```console":
                current, start = [], lineno
            continue
        if line.strip() == "```":
            blocks.append(Block(document, start, current))
            current = None
        elif line.startswith("$ "):
            current.append(Command(line[2:]))
        elif (m := re.fullmatch(r"# exit (\d+)", line.strip())) and current:
            current[-1].exit = int(m.group(1))
        elif current:
            current[-1].expected.append(line)
    return blocks


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in console_blocks(document)]


# ------------------------------------------------------------------------------ shape

_MASKS = [
    (re.compile(r"\b\d+ (s|min|h|d) ago\b"), "AGE"),
    # sizes: a few bytes more in the checkpoint turn "25.7 KiB" into "26 KiB" (no decimals then)
    (re.compile(r"\b\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)\b"), "SIZE"),
    (re.compile(r"\b\d+(\.\d+)+(\+[\w.]+)?\b"), "V"),  # versions (2.13.0+cpu) and, alike, decimals
    (re.compile(r"\b[0-9a-f]{8,}\b"), "HEX"),  # sha256, key ids, timestamps: lengths are stable
    (re.compile(r"[-+]?\d[\d,]*(\.\d+)?([eE][-+]?\d+)?"), "N"),
    (re.compile(r"[─━]{3,}"), "RULE"),
]


def shape(line: str, root: str) -> str:
    for doc_root in DOC_ROOTS:
        line = line.replace(doc_root, "ROOT")
    line = line.replace(root, "ROOT")
    for pattern, mask in _MASKS:
        line = pattern.sub(mask, line)
    return " ".join(line.split())


def trimmed(lines: list[str]) -> list[str]:
    """Without the blank lines that separate one command's output from the next ``$``."""
    while lines and not lines[-1]:
        lines = lines[:-1]
    return lines


def matches(expected: list[str], actual: list[str]) -> bool:
    """``expected`` against ``actual``, line by line; a ``...`` line matches any number of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


# ------------------------------------------------------------------------------ the directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/demo, runs/damaged, runs/secure and the two key files, as the docs describe them."""
    root = tmp_path_factory.mktemp("docs")
    demo = root / "runs" / "demo"
    fit(CheckpointCallback(dirpath=str(demo), monitor="val_loss", save_top_k=3, save_last=True), max_epochs=4)

    damaged = root / "runs" / "damaged"
    shutil.copytree(demo, damaged)
    with open(damaged / "epoch=1-step=16.ckpt", "r+b") as f:
        f.truncate(4096)
    payload = bytearray((damaged / "epoch=2-step=24.ckpt").read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    (damaged / "epoch=2-step=24.ckpt").write_bytes(bytes(payload))
    (damaged / "epoch=4-step=40.ckpt.pending").write_text('{"name": "epoch=4-step=40.ckpt", "started": 0}')
    (damaged / "epoch=4-step=40.ckpt").write_bytes(b"the first bytes of a payload that was never committed")

    (root / "sign.key").write_text(SIGN_KEY + "\n")
    (root / "enc.key").write_text(ENC_KEY + "\n")
    secure = root / "runs" / "secure"
    fit(CheckpointCallback(dirpath=str(secure), monitor="val_loss", save_top_k=-1,
                           signer=Signer(bytes.fromhex(SIGN_KEY)), encryptor=Encryptor(bytes.fromhex(ENC_KEY))),
        max_epochs=3)
    manifest = secure / "epoch=0-step=8.ckpt.manifest.json"
    text = manifest.read_text()
    edited = re.sub(r'("val_loss": )[0-9.eE+-]+', r"\g<1>0.01", text, count=1)
    assert edited != text
    manifest.write_text(edited)
    return root


@pytest.fixture
def workdir(pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "lcdemo"
    shutil.copytree(pristine, root)
    monkeypatch.chdir(root)
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps its usage text to the terminal
    return root


# ------------------------------------------------------------------------------ running


@contextlib.contextmanager
def stdin_from(text: str) -> Iterator[None]:
    saved = sys.stdin
    sys.stdin = io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def run_session(block: Block, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                substitute: dict[str, str]) -> None:
    for command in block.commands:
        line = command.line
        for old, new in substitute.items():
            line = line.replace(old, new)
        if m := re.fullmatch(r"export (\w+)=\$\(cat (\S+)\)", line):
            monkeypatch.setenv(m.group(1), (root / m.group(2)).read_text().strip())
            continue
        code, out, err = run_line(line, capsys)
        actual = trimmed([shape(x, str(root)) for x in (out + err).splitlines()])
        expected = trimmed([shape(x, str(root)) for x in command.expected])
        where = f"{block.id}: $ {command.line}"
        assert matches(expected, actual), f"{where}\n--- documented\n" + "\n".join(command.expected) + \
            "\n--- printed now\n" + out + err
        if command.exit is not None:
            assert code == command.exit, f"{where}: exit {code}, documented {command.exit}\n{out}{err}"


def run_line(line: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one documented command line (a pipe into ``python -c`` allowed)."""
    stages = [shlex.split(stage) for stage in split_pipe(line)]
    capsys.readouterr()
    stdin, code = "", 0
    for i, argv in enumerate(stages):
        with stdin_from(stdin):
            if argv[0] == "lightning-ckpt":
                try:
                    code = main(argv[1:])
                except SystemExit as exc:  # argparse: --help, usage errors
                    code = int(exc.code or 0)
            elif argv[:2] == ["python", "-c"]:
                exec(compile(argv[2], "<docs>", "exec"), {"__name__": "__main__"})  # noqa: S102
            else:
                pytest.fail(f"cannot run {argv[0]!r} from the docs: {line}")
        captured = capsys.readouterr()
        if i < len(stages) - 1:
            stdin = captured.out
            assert code == 0, f"{line}: a stage failed\n{captured.err}"
        else:
            return code, captured.out, captured.err
    raise AssertionError("unreachable")


def split_pipe(line: str) -> list[str]:
    """``a | b`` into its stages; a ``|`` inside quotes (``min|max``) stays."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|")
    lexer.whitespace_split = True
    stages, current = [], []
    for token in lexer:
        if token == "|":
            stages.append(shlex.join(current))
            current = []
        else:
            current.append(token)
    stages.append(shlex.join(current))
    return stages


# ------------------------------------------------------------------------------ tests


def test_every_console_block_is_run_or_listed_as_not_run() -> None:
    blocks = all_blocks()
    assert len(blocks) >= 10
    firsts = {(b.document, b.commands[0].line) for b in blocks if b.commands}
    assert set(NOT_RUN) <= firsts, f"NOT_RUN lists blocks the docs no longer have: {set(NOT_RUN) - firsts}"
    assert all(b.commands for b in blocks), [b.id for b in blocks if not b.commands]


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if console_blocks(d)])
def test_console_examples_print_what_the_docs_show(
    document: str, workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    substitute: dict[str, str] = {}
    for block in console_blocks(document):
        if (document, block.commands[0].line) in NOT_RUN:
            continue
        if any("s3://" in c.line for c in block.commands):
            substitute = s3_substitutions(block, request)
        run_session(block, workdir, capsys, monkeypatch, substitute)


def s3_substitutions(block: Block, request: pytest.FixtureRequest) -> dict[str, str]:
    """The documented bucket, endpoint and credentials -> a bucket of the test's S3 server holding runs/demo."""
    server: Any = request.getfixturevalue("s3_server")
    bucket = server.make_bucket()
    fs = server.filesystem()
    pristine: Path = request.getfixturevalue("pristine")  # runs/demo before the docs' prune
    fs.put(str(pristine / "runs" / "demo") + "/", f"{bucket}/demo/", recursive=True)
    documented = block.commands[0].line
    endpoint = re.search(r"http://127\.0\.0\.1:\d+", documented)
    key = re.search(r"key=(\S+)", documented)
    secret = re.search(r"secret=(\S+)", documented)
    assert endpoint and key and secret, documented
    return {"s3://training": bucket, endpoint.group(0): server.endpoint_url,
            f"key={key.group(1)}": f"key={server.key}", f"secret={secret.group(1)}": f"secret={server.secret}"}


def test_the_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    command = 'pip install -e ".[test]" && python -m pytest -q'
    assert command in readme
    assert command in (REPO / ".ci" / "run").read_text()
