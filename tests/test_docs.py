"""The README and docs/ as a reader uses them: every code block runs as written, every link resolves.

Convention (docs/README.md says the same for writers):

* a fenced block tagged ``python`` runs on its own in a fresh Python process; one tagged ``bash`` (or
  ``sh``/``shell``) runs in bash with the package's commands on PATH. Both run in an empty working
  directory, on the CPU, with a cache folder of their own where ``ensure_tiny_model()`` builds the
  tiny model once for the whole session;
* a block fenced without a language is a picture, a formula or output, not code;
* ``<!-- skip-test: REASON -->`` on the line before a block skips it; the reason is required (it
  needs a GPU, a real checkpoint, a server, the network, or minutes);
* every relative link ``[text](target)`` must name an existing file or folder (web links are not
  fetched: the test machines have no network).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
SKIP = re.compile(r"<!--\s*skip-test:\s*(?P<reason>[^>]*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page``, with their language and any skip marker on the line before."""
    blocks, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].startswith("```"))
        previous = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(previous)
        if "skip-test" in previous and (marker is None or not marker.group("reason")):
            raise AssertionError(f"{page.name}:{index}: a skip-test marker needs a reason")
        blocks.append(
            Block(page, index + 1, opening.group("lang"), "\n".join(lines[index + 1 : end]),
                  marker.group("reason") if marker else None)
        )
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]
RUN_BLOCKS = [block for block in ALL_BLOCKS if block.language in RUNNABLE]


def test_the_pages_have_runnable_blocks_and_the_markers_are_well_formed():
    assert len(PAGES) >= 6, [p.name for p in PAGES]
    assert len([b for b in RUN_BLOCKS if b.skip_reason is None]) >= 6
    unknown = {b.language for b in ALL_BLOCKS} - set(RUNNABLE) - {""}
    assert not unknown, f"fence languages this test does not know how to run: {unknown}"


@pytest.fixture(scope="session")
def docs_cache(tmp_path_factory) -> Path:
    """A cache folder shared by the blocks, so the tiny model is built once."""
    return tmp_path_factory.mktemp("docs-cache")


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.id for b in RUN_BLOCKS])
def test_code_block_runs_as_written(block: Block, docs_cache: Path, tmp_path: Path):
    if block.skip_reason:
        pytest.skip(block.skip_reason)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "XDG_CACHE_HOME": str(docs_cache), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "CUDA_VISIBLE_DEVICES": "", "XBAI_DEMO_ENGINE": "hf"}
    command = [sys.executable, "-c", block.code] if RUNNABLE[block.language] == "python" else ["bash", "-euo", "pipefail", "-c", block.code]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.id} failed:\n{block.code}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not prose
    links = [m.group("target") or m.group("image") for m in LINK.finditer(text)]
    return [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=[p.name if p.parent == ROOT else f"docs/{p.name}" for p in PAGES])
def test_every_relative_link_resolves(page: Path):
    missing = [link for link in relative_links(page) if not (page.parent / link.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing paths: {missing}"


def test_the_readme_stays_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_heading = re.findall(r"^## (.+)$", text, flags=re.M)[0]
    assert first_heading == "Two commands" and "make demo" in text and "make test" in text
    assert "SPEC" not in text
