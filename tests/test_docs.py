"""The documentation stays true to the code: docs/cli.md is every command's --help as the commands print it, and
the README and docs/ pages link only to files and headings that exist."""

import pathlib
import re

from skymoe_jax.cli import BENCHES, COMMANDS, REFERENCE, reference

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cli_reference_is_every_commands_help():
    expected = reference()
    committed = (ROOT / REFERENCE).read_text() if (ROOT / REFERENCE).exists() else ""
    assert committed == expected, (
        f"{REFERENCE} differs from the commands' --help; regenerate it with `python tools/cli_reference.py` "
        "and commit the result"
    )
    for name in COMMANDS:
        assert f"\n## skymoe {name}\n" in expected
    for name in BENCHES:
        assert f"\n## skymoe bench {name}\n" in expected
    assert "this machine's cores" in expected  # machine-dependent defaults are stated, not this machine's values


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_and_docs_link_to_files_and_headings_that_exist():
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target) if target else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, "links to missing files or headings: " + ", ".join(broken)
