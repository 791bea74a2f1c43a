"""The Python examples of the README and docs/ run as written, and the pages' relative links name files that exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "docs/api.md",
    "docs/data.md",
    "docs/method.md",
    "docs/pipelines.md",
    "docs/export.md",
    "docs/dicom_folders.md",
]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page, tmp_path):
    blocks = _blocks(page)
    assert blocks, f"{page} has no python example"
    namespace: dict = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples that write files write them here
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
    finally:
        os.chdir(cwd)


def test_ci_runs_the_readmes_test_command():
    """.ci/run runs the tests as the README's first screen tells a user to (the same pytest arguments)."""
    readme = re.search(r"bash \.ci/setup --dev && python3 -m pytest (.+)\n", (ROOT / "README.md").read_text())
    ci = re.search(r'"\$PY" -m pytest (.+)\n', (ROOT / ".ci" / "run").read_text())
    assert readme and ci, "the README's test command or .ci/run's pytest line is not where this test looks"
    assert ci.group(1) == readme.group(1)


def test_relative_links_of_the_docs_point_at_files_that_exist():
    """Every relative link and picture of the README, docs/, the bundles' and the benchmarks' pages names a file of
    the repository (a renamed result or figure would leave a dead link otherwise)."""
    pages = [
        ROOT / "README.md",
        *ROOT.glob("docs/*.md"),
        *ROOT.glob("bundles/**/*.md"),
        *ROOT.glob("benchmarks/**/*.md"),
    ]
    dead, checked = [], 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold shell text, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor of the page itself
            checked += 1
            if not (page.parent / target.split("#")[0]).exists():
                dead.append(f"{page.relative_to(ROOT)}: {target}")
    assert checked > 100, f"only {checked} relative links found: the pattern no longer matches the pages"
    assert not dead, "links to files that do not exist:\n" + "\n".join(dead)
