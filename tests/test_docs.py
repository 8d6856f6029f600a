"""The documentation stays true to the code: docs/cli.md is every command's --help as the commands print it, and
the README and docs/ pages link only to files that exist."""

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


def test_readme_and_docs_link_to_files_that_exist():
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "links to missing files: " + ", ".join(missing)
