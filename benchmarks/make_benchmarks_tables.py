"""Regenerate the accuracy tables of ``bench_accuracy.py`` from its run cache alone.

Reads ``runs.jsonl`` of an output folder, trains nothing, and writes one markdown section
per set of protocol settings: the exact commands that produced the runs, the accuracy
table (post-training and trained top-1 per method and size, every seed), the goal check
and the recipes. Every run is keyed on the ddq version and the git commit it ran with;
the script refuses to mix commits (choose one with ``--code``) and refuses runs of a
working tree with uncommitted changes (``+dirty``) unless ``--allow-dirty``.

    python benchmarks/make_benchmarks_tables.py                      # accuracy_v3
    python benchmarks/make_benchmarks_tables.py --out-dir benchmarks/results/accuracy_v3 \\
        --code 0.1.0+0123456789ab --output benchmarks/results/accuracy_v3/tables.md
    python benchmarks/make_benchmarks_tables.py --check              # exit 1 if stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_accuracy import load_cache, markdown


def _settings(rec: dict) -> dict:
    s = json.loads(rec["key"].split("|")[0])
    s.pop("arch"), s.pop("seed")
    return s


def tables(records: list[dict], code: str | None = None, allow_dirty: bool = False) -> str:
    """The markdown of ``records`` (all of one code version). ``ValueError`` when they mix
    code versions and ``code`` does not pick one, or when that version is ``+dirty``
    without ``allow_dirty``."""
    codes = sorted({_settings(r)["code"] for r in records})
    if code is not None:
        if code not in codes:
            raise ValueError(f"no runs of code {code!r}; the cache has {codes}")
        codes = [code]
    if not codes:
        raise ValueError("the cache has no runs")
    if len(codes) > 1:
        raise ValueError(
            f"the cache mixes runs of {len(codes)} code versions {codes}: a table must come "
            "from one commit; pick one with --code"
        )
    (chosen,) = codes
    if chosen.endswith("+dirty") and not allow_dirty:
        raise ValueError(
            f"the runs of {chosen!r} ran with uncommitted changes, so no commit identifies "
            "their code; rerun from a clean checkout, or pass --allow-dirty for a draft"
        )
    groups: dict[str, list[dict]] = {}
    for r in records:
        s = _settings(r)
        if s["code"] == chosen:
            groups.setdefault(json.dumps(s, sort_keys=True), []).append(r)
    out = ["# Accuracy versus budget (generated from the run cache; do not edit)", ""]
    for key in sorted(groups):
        settings = json.loads(key)
        shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "code")
        out += [f"## Settings: {shown}", "", *markdown(groups[key]), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="benchmarks/results/accuracy_v3",
                   help="the folder with runs.jsonl")  # fmt: skip
    p.add_argument("--code", default=None, help="the code version (ddq version+commit) to show")
    p.add_argument("--allow-dirty", action="store_true",
                   help="accept runs of a working tree with uncommitted changes (drafts)")  # fmt: skip
    p.add_argument("--output", default=None, help="default: OUT_DIR/tables.md")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if the output file differs from the cache")  # fmt: skip
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    cache_path = out_dir / "runs.jsonl"
    if not cache_path.is_file():
        print(f"error: no run cache at {cache_path}", file=sys.stderr)
        return 2
    try:
        text = tables(list(load_cache(cache_path).values()), args.code, args.allow_dirty)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else out_dir / "tables.md"
    if args.check:
        same = output.is_file() and output.read_text() == text
        print(f"{output}: {'up to date' if same else 'stale'}")
        return 0 if same else 1
    output.write_text(text)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
