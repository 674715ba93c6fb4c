"""The repository stands on its own: every file path that its code and documents name exists in it, and no
document outside it (the private design notes the project started from) is cited."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = re.compile(r"(?<![\w/.])((?:docs|experiments|tests|jaxdlm|convert_weights|\.ci)/[\w./-]*\w"
                  r"\.(?:md|py|json|png|sh|toml|jinja|txt))")
OUTSIDE = re.compile(r"\bSPEC\.md\b|\bDESIGN\.md\b|\.\./shared\b")


def _project_files():
    try:
        out = subprocess.check_output(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                      text=True, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in out.split() if f.endswith((".py", ".md", ".sh", ".toml")) and os.path.isfile(
        os.path.join(ROOT, f))]


def test_named_files_exist_and_nothing_outside_is_cited():
    missing, outside = [], []
    for f in _project_files():
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            text = fh.read()
        if f != "tests/test_docs.py" and OUTSIDE.search(text):
            outside.append(f)
        for m in PATH.finditer(text):
            if "<" not in m.group(1) and not os.path.exists(os.path.join(ROOT, m.group(1))):
                missing.append(f"{f} names {m.group(1)}")
    assert not missing, missing
    assert not outside, f"files citing documents that are not in the repository: {outside}"
