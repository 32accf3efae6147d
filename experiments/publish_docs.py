"""Copy generated results into the docs: every block

    <!-- generated from docs/results/NAME/FILE.md -->
    ...
    <!-- end generated -->

in README.md and docs/*.md is replaced by that file's text (without its first heading), so a table in the
manual is always the one `fwdgrad main --out ...` or `fwdgrad report ...` wrote, with its command, commit and
CPU. `--check` changes nothing and exits 1 if a block differs from its source (tests/test_published.py).

    uv run python experiments/publish_docs.py            # refresh the blocks
    uv run python experiments/publish_docs.py --check    # verify them
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- generated from (?P<src>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def body_of(source: Path) -> str:
    """The source's text without its first line when that is a heading."""
    lines = source.read_text().splitlines(keepends=True)
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "".join(lines).strip("\n") + "\n"


def refresh(text: str) -> tuple[str, list[str]]:
    """The text with every block replaced by its source, and the sources that differed."""
    stale = []

    def fill(match: re.Match) -> str:
        src = ROOT / match["src"]
        if not src.is_file():
            raise FileNotFoundError(f"generated block source {match['src']!r} does not exist")
        new = body_of(src)
        if match["body"] != new:
            stale.append(match["src"])
        return match.group(1) + new + match.group(4)

    return BLOCK.sub(fill, text), stale


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify only; exit 1 if a block is stale")
    args = ap.parse_args(argv)
    stale_pages = []
    for page in pages():
        text, stale = refresh(page.read_text())
        if stale:
            stale_pages.append(f"{page.relative_to(ROOT)} ({', '.join(stale)})")
            if not args.check:
                page.write_text(text)
    verb = "stale" if args.check else "refreshed"
    print(f"{verb}: {'; '.join(stale_pages)}" if stale_pages else "all generated blocks are up to date")
    return 1 if args.check and stale_pages else 0


if __name__ == "__main__":
    sys.exit(main())
