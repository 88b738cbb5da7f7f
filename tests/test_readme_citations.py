"""Every file or folder under benchmarks/ that the READMEs (and the docs/ pages the README links to) cite
is in the repository: on disk and not ignored by git (an ignored one is never committed, so a checkout
would lack it)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "config/README.md",
           *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))
# A repository path: benchmarks/... not inside a longer path (../shared/benchmarks/... is outside the repo,
# ../benchmarks/... in a config example is relative to the user's working directory).
CITED = re.compile(r"(?<![\w./-])benchmarks/[\w./-]*[\w/]")


def citations():
    out = []
    for name in READMES:
        for n, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            out += [(f"{name}:{n}", path) for path in CITED.findall(line)]
    return out


def test_the_readmes_cite_benchmark_results():
    """The pattern finds the measured logs the README points to (not an empty list that passes anything)."""
    assert any(path.startswith("benchmarks/results/") for _, path in citations())


@pytest.mark.parametrize("where,path", citations(), ids=lambda x: x)
def test_cited_benchmark_path_is_in_the_repository(where, path):
    target = ROOT / path
    assert target.is_file() or (target.is_dir() and any(target.iterdir())), f"{where} cites {path}, which is missing"
    if shutil.which("git") and (ROOT / ".git").exists():
        p = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert p.returncode == 1, f"{where} cites {path}, which .gitignore ignores"
