"""The documents stay true: every shell command in README.md and docs/*.md runs, checks or says why not, and the
configuration reference matches the schema.

Each command line of a ```bash / ```sh / ```console block is, in this order:

1. **run for real** when it is cheap and offline: ``aigc config``, ``aigc registry`` (on an empty registry),
   ``aigc --help``, ``python -m aigc.config.reference``;
2. **checked statically** otherwise: an ``aigc SUB ...`` line parses with the CLI's own argparse parser (nothing
   runs), a ``make TARGET`` names a target of the Makefile, and any ``configs/...`` or ``tune_spaces/...`` file it
   names exists;
3. or its block carries a marker on the line before the fence saying why it cannot run here, e.g.
   ``<!-- not run: needs a GPU -->``. A line of a marked block is still checked statically where it can be.

A line that is none of these fails the test, naming the document, the line and what to do.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from aigc import cli
from aigc.config.reference import render_reference

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^\s*<!--\s*not run:\s*(\S.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w-]*)\s*$")
# Files a command may name that must exist (a mistyped config is the commonest doc rot).
PROJECT_FILE = re.compile(r"(?:^|[=/\s])((?:configs|tune_spaces|serve_apps|jobs)/[\w.\-/]+\.(?:ya?ml|py))")


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int  # 1-based line of the command's first physical line
    text: str  # continuation lines joined
    marker: str | None  # the block's "not run" reason

    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}: {self.text!r}"


def shell_commands(path: Path) -> list[Command]:
    """Every command line of the shell blocks of one Markdown file (comments and console output left out)."""
    lines = path.read_text().splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(2):
            i += 1
            continue
        lang, start = m.group(2), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if lang in SHELL_LANGS:
            prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(prev)
            out += _block_commands(path, lines, start + 1, end, lang, marker.group(1) if marker else None)
        i = end + 1
    return out


def _block_commands(path: Path, lines: list[str], first: int, end: int, lang: str, marker: str | None):
    out, buf, at = [], "", 0
    for j in range(first, end):
        text = lines[j].strip()
        if not buf:
            if lang == "console":
                if not text.startswith("$ "):
                    continue  # output
                text = text[2:]
            if not text or text.startswith("#"):
                continue
            at = j + 1
        if text.endswith("\\"):
            buf += text[:-1].rstrip() + " "
            continue
        out.append(Command(path, at, buf + text, marker))
        buf = ""
    return out


ALL_COMMANDS = [c for doc in DOCS for c in shell_commands(doc)]


def _words(cmd: Command) -> list[str]:
    """The command's words without comments, leading VAR=value assignments and a `.venv/bin/` prefix."""
    try:
        words = shlex.split(cmd.text, comments=True)
    except ValueError:  # unbalanced quotes: good enough to find the program
        words = cmd.text.split("#", 1)[0].split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if words:
        words[0] = words[0].removeprefix(".venv/bin/")
    return words


def _parser():
    """The CLI's own argparse parser (whatever the builder is called now)."""
    for name in ("build_parser", "make_parser", "parser", "_parser", "_build_parser"):
        builder = getattr(cli, name, None)
        if callable(builder):
            return builder()
    raise AssertionError("aigc.cli has no parser builder (build_parser/_parser): update tests/test_docs.py")


def _parses(args: list[str]) -> str | None:
    """None when ``aigc ARGS`` parses as `aigc.cli.main` parses it (overrides after options included), else why."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns, extra = _parser().parse_known_args(args)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(ns, "overrides")]
    return f"unrecognized arguments: {' '.join(bad)}" if bad else None


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


def _run_aigc(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """``aigc.cli.main`` in this process, from the repository root, its registry an empty directory."""
    if args and args[0] == "registry":
        args = [*args, f"registry_dir={tmp_path / 'registry'}"]
    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()


RUN_AIGC = {"config", "registry", "--help", "-h"}


def check_command(cmd: Command, tmp_path: Path) -> str | None:
    """None when the command ran, checked or is marked; else what is wrong and what to do."""
    words = _words(cmd)
    for name in PROJECT_FILE.findall(cmd.text):
        if not (ROOT / name).exists():
            return f"names {name}, which does not exist"
    if not words:
        return None
    prog, args = words[0], words[1:]
    if prog == "aigc":
        why = _parses(args)
        if why:
            return f"does not parse with the aigc CLI: {why}"
        if args and args[0] in RUN_AIGC and cmd.marker is None:
            code, out = _run_aigc(args, tmp_path)
            if code != 0:
                return f"exited with status {code}: {out.strip()[-500:]}"
        return None
    if prog == "make":
        targets = [a for a in args if "=" not in a and not a.startswith("-")]
        missing = sorted(set(targets) - _make_targets())
        return f"names Makefile targets that do not exist: {missing}" if missing else None
    if prog in ("python", "python3") and args[:2] == ["-m", "aigc.config.reference"] and cmd.marker is None:
        # Run for real; a `> docs/configuration.md` redirection is checked, not written: the output must equal it.
        target = args[args.index(">") + 1] if ">" in args else None
        proc = subprocess.run([sys.executable, *args[:2]], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={"PYTHONPATH": str(ROOT / "platform"), "PATH": ""})  # fmt: skip
        if proc.returncode != 0:
            return f"exited with status {proc.returncode}: {proc.stderr[-500:]}"
        if target and (ROOT / target).read_text() != proc.stdout:
            return f"writes what {target} does not hold: run `make docs`"
        return None
    if cmd.marker:
        return None
    return (
        "is neither run nor checked by tests/test_docs.py: make it a command the test can check, or put "
        "<!-- not run: REASON --> on the line before its block"
    )


def test_docs_have_shell_commands():
    """The parser finds the blocks (a test that finds nothing would pass forever)."""
    readme = [c.text for c in ALL_COMMANDS if c.doc.name == "README.md"]
    assert readme[:2] == [
        "make demo   # set up, then preprocess -> LoRA fine-tune -> sweep -> serve -> chat, on an embedded Ray cluster",
        "make test   # set up, then lint + every test tier (unit, integration, slow end-to-end), ~60 min on 2 cores",
    ]
    assert len({c.doc for c in ALL_COMMANDS}) >= 6


def test_every_documented_command_runs_checks_or_says_why_not(tmp_path):
    failures = [f"{c.where()} {why}" for c in ALL_COMMANDS if (why := check_command(c, tmp_path))]
    assert not failures, "\n".join(failures)


def test_markers_give_a_reason():
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            if "not run" in line and line.lstrip().startswith("<!--"):
                assert MARKER.match(line), f"{doc.relative_to(ROOT)}:{n}: write <!-- not run: REASON -->"


def test_checks_catch_what_they_claim(tmp_path):
    """A wrong command is caught by each kind of check."""
    doc = ROOT / "README.md"
    assert "does not parse" in check_command(Command(doc, 1, "aigc trian --config configs/demo.yaml", None), tmp_path)
    assert "unrecognized" in check_command(Command(doc, 1, "aigc config --confg x.yaml", None), tmp_path)
    assert "does not exist" in check_command(Command(doc, 1, "aigc train --config configs/nope.yaml", None), tmp_path)
    assert "targets" in check_command(Command(doc, 1, "make tests", None), tmp_path)
    assert "exited with status 2" in check_command(Command(doc, 1, "aigc config train.lr=-1", None), tmp_path)
    assert "neither run nor checked" in check_command(Command(doc, 1, "curl -s http://x", None), tmp_path)
    assert check_command(Command(doc, 1, "curl -s http://x", "needs a server"), tmp_path) is None
    stale = Command(doc, 1, ".venv/bin/python -m aigc.config.reference > README.md", None)
    assert "run `make docs`" in check_command(stale, tmp_path)
    assert (
        check_command(Command(doc, 1, ".venv/bin/aigc train --config configs/demo.yaml a.b=1", None), tmp_path) is None
    )


def test_console_blocks_take_prompt_lines_only(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("<!-- not run: a server -->\n```console\n$ aigc config \\\n  train.lr=1\noutput line\n```\n")
    (cmd,) = shell_commands(md)
    assert (cmd.line, cmd.text, cmd.marker) == (2 + 1, "aigc config train.lr=1", "a server")


def test_configuration_reference_is_current():
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == render_reference(), (
        "docs/configuration.md is stale: the config schema's fields or descriptions changed. Run `make docs` "
        "and commit docs/configuration.md"
    )


@pytest.mark.parametrize(
    ("key", "default"),
    [("output_dir", "`runs/demo`"), ("data.path", "`assets/demo-data/support.jsonl`"), ("train.run_name", "unset"),
     ("serve.autoscaling.max_replicas", "`2`"), ("serve.max_queued_requests", "`32`")],
)  # fmt: skip
def test_reference_has_a_row_per_key_with_its_default(key, default):
    """Top-level, nested and serving keys each have a row: key, type, default, meaning."""
    row = next((r for r in render_reference().splitlines() if r.startswith(f"| `{key}` |")), None)
    assert row is not None, key
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert cells[2] == default and cells[3], row
