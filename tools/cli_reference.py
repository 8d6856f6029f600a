"""Writes docs/cli.md, the command-line reference, from every `skymoe` command's --help:

    python tools/cli_reference.py            # from the repository root or anywhere

tests/test_docs.py fails while the committed file differs from what this writes."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, installed or not

from skymoe_jax.cli import REFERENCE, reference  # noqa: E402 - after the path

if __name__ == "__main__":
    path = ROOT / REFERENCE
    path.write_text(reference())
    print(f"wrote {path.relative_to(ROOT)}")
