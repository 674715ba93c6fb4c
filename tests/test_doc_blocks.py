"""Every fenced code block of README.md and docs/*.md runs as written, unless its info string marks it a sketch.

The rule (docs/README.md, "Code blocks"): ``python`` blocks run in-process, each in a fresh namespace; ``bash``
blocks may hold only ``jaxdlm ...`` command lines, each run through the CLI in-process; ``toml`` / ``json`` blocks
must parse; the word ``sketch`` after the language (```` ```python sketch ````) exempts a block; ``text`` or no
info string is prose (pseudocode, synopses, layouts), and an untagged block must not look like code.  The set-up
commands of the README are sketches (they install); the test command is checked against ``.ci/run`` instead."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import tempfile
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
RUN = ("python", "bash")
PARSE = {"toml": tomllib.loads, "json": json.loads}
PROSE = ("", "text")
LOOKS_LIKE_CODE = re.compile(r"^(import \w|from [\w.]+ import |jaxdlm |python3? )")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (``path:line`` of the opening fence), its language, sketch flag, body."""
    path: str
    line: int
    lang: str
    sketch: bool
    body: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(text: str, path: str) -> list[Block]:
    """The fenced blocks of a markdown text (fences at column 0; a block ends at a fence of the same kind and at
    least the same length).  An unclosed fence is an error naming its line."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, words = m.group(1), m.group(2).split()
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].rstrip().startswith(fence[0] * len(fence)) and not lines[j].strip(fence[0]).strip()),
                   None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: the code fence {fence!r} is never closed")
        lang = words[0].lower() if words else ""
        blocks.append(Block(path, i + 1, lang, "sketch" in words[1:], "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def _doc_files() -> list[str]:
    return ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _all_blocks() -> list[Block]:
    out = []
    for rel in _doc_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            out += parse_blocks(f.read(), rel)
    return out


BLOCKS = _all_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in RUN and not b.sketch]


def command_lines(body: str) -> list[str]:
    """The command lines of a shell block: backslash continuations joined, blank and comment lines dropped."""
    lines, parts = [], []
    for raw in body.split("\n"):
        part = raw.strip()
        parts.append(part.removesuffix("\\").strip())
        if part.endswith("\\"):
            continue
        line, parts = " ".join(p for p in parts if p), []
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------- the rule itself


def test_parser_reads_languages_sketch_marks_and_bodies():
    text = "x\n```python\na = 1\n```\n```bash sketch\nrm -rf /\n```\n````text\n```\n````\n```\nplain\n```\n"
    got = [(b.line, b.lang, b.sketch, b.body) for b in parse_blocks(text, "<inline text>")]
    assert got == [(2, "python", False, "a = 1"), (5, "bash", True, "rm -rf /"), (8, "text", False, "```"),
                   (11, "", False, "plain")]
    with pytest.raises(ValueError, match=r"<inline text>:1: the code fence"):
        parse_blocks("```python\nnever closed\n", "<inline text>")
    assert command_lines("# c\njaxdlm info \\\n  --config\n\njaxdlm demo  # d\n") == [
        "jaxdlm info --config", "jaxdlm demo  # d"]


def test_every_block_has_a_known_language_and_untagged_blocks_do_not_look_like_code():
    known = set(RUN) | set(PARSE) | set(PROSE)
    unknown = [f"{b.where} ({b.lang!r})" for b in BLOCKS if b.lang not in known]
    assert not unknown, f"use one of {sorted(known)} as a block's language (add 'sketch' to exempt it): {unknown}"
    untagged = [b.where for b in BLOCKS if not b.lang and LOOKS_LIKE_CODE.match(b.body)]
    assert not untagged, f"untagged blocks that look like code: tag them python / bash (or text): {untagged}"


def test_there_are_blocks_that_run():
    """The README's first example and at least one block of docs/ run (a parser that finds nothing passes
    nothing)."""
    assert any(b.path == "README.md" and b.lang == "python" for b in RUNNABLE)
    assert any(b.path.startswith("docs") and b.lang == "python" for b in RUNNABLE)
    assert any(b.lang == "bash" for b in RUNNABLE)


def test_readme_set_up_commands_are_the_ones_ci_runs():
    """``.ci/run`` runs the README's test command verbatim; the main command installs and runs ``jaxdlm demo``."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line for line in f.read().split("\n") if line.strip() and not line.startswith(("#", "set ", "cd "))]
    readme = [b.body.strip() for b in BLOCKS if b.path == "README.md" and b.lang == "bash"]
    assert ci[-1].strip() in readme, f".ci/run's command {ci[-1]!r} is not a README block"
    assert any(cmd.endswith("&& .venv/bin/jaxdlm demo") and ".venv/bin/pip install -q -e ." in cmd for cmd in readme)


# ------------------------------------------------------------------------------------------- running the blocks


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in PARSE and not b.sketch], ids=lambda b: b.where)
def test_data_block_parses(block):
    PARSE[block.lang](block.body)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.where)
def test_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here, relative path or temporary folder
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if block.lang == "python":
        exec(compile(block.body, block.where, "exec"), {"__name__": "__doc_block__"})  # noqa: S102
        return
    from jaxdlm import cli

    for line in command_lines(block.body):
        argv = shlex.split(line, comments=True)
        assert argv[0] == "jaxdlm", (f"{block.where}: only `jaxdlm ...` commands run in the tests, not {line!r}; "
                                     f"mark the block `bash sketch` if it cannot run as written")
        # --no-compile-cache: keep the test session's own compilation cache (conftest) in place
        assert cli.main(argv[1:] + ["--no-compile-cache"]) == 0, f"{block.where}: {line!r} failed"


def test_relative_links_resolve():
    """Every relative markdown link of README.md and docs/*.md names a file or folder that exists."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for rel in _doc_files():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            text = f.read()
        for target in link.findall(text):
            if "://" not in target and not os.path.exists(os.path.join(ROOT, os.path.dirname(rel), target)):
                broken.append(f"{rel} -> {target}")
    assert not broken, broken
