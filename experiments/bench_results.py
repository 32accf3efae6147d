"""Where a benchmark script's result goes, the same for every script that publishes one: the JSON on
stdout; with ``--out DIR`` also DIR/<stem>.json and DIR/<stem>.md (the Markdown that
`experiments/publish_docs.py` copies into the docs); ``--render JSON`` turns an earlier JSON into its
Markdown without measuring. The result's provenance names the command that produced it."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from fwdgrad.files import write_json, write_text
from fwdgrad.provenance import provenance


def add_arguments(ap: argparse.ArgumentParser, stem: str) -> None:
    ap.add_argument("--out", type=Path, default=None, help=f"folder for {stem}.json and {stem}.md")
    ap.add_argument("--render", type=Path, default=None, help=f"a {stem}.json to turn into {stem}.md")


def source(script: str, argv: list[str] | None) -> dict:
    """The provenance record of a run of `script` (experiments/NAME.py) with `argv`."""
    given = argv if argv is not None else sys.argv[1:]
    return provenance(f"uv run python experiments/{script} {shlex.join(given)}".strip())


def rendered(args: argparse.Namespace, markdown: Callable[[dict], str]) -> dict | None:
    """With --render: the earlier result, its Markdown rewritten beside it; else None."""
    if args.render is None:
        return None
    result = json.loads(args.render.read_text())
    write_text(args.render.with_suffix(".md"), markdown(result))
    return result


def publish(result: dict, args: argparse.Namespace, stem: str, markdown: Callable[[dict], str]) -> dict:
    """Print the result as JSON and, with --out, write <stem>.json and <stem>.md there."""
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{stem}.json", result)
        write_text(args.out / f"{stem}.md", markdown(result))
    return result
