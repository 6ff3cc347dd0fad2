"""Seconds per edit of this working tree against a git revision, measured alternately in one run.

A change's speed-up is only visible against the code before it on the same machine at the same
time (this host's timings drift by ±20%). This script checks the base revision out into a
temporary git worktree (sharing this tree's `stats/`), then runs `bench_edit.py` with the same
arguments from the base and from this tree in turn, round after round, and prints each round's
total s/edit and the ratio of the medians.

    python benchmarks/bench_revisions.py --base HEAD --rounds 4 -- --facts 2 --paths default
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent


def total_seconds(output: str) -> float:
    """The 'total s/edit' of the last row of bench_edit's table."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| path |"))
    column = [cell.strip() for cell in header.split("|")].index("total s/edit")
    return float(lines[-1].split("|")[column])


def run_bench(tree: Path, bench_args: list[str]) -> float:
    """bench_edit.py of `tree`, importing that tree's factedit; returns its total s/edit."""
    result = subprocess.run(
        [sys.executable, str(tree / "benchmarks" / "bench_edit.py"), *bench_args],
        cwd=tree,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree / "src")},
    )
    if result.returncode != 0:
        sys.exit(f"bench_edit.py failed in {tree}:\n{result.stderr[-2000:]}")
    return total_seconds(result.stdout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against (default: HEAD)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("bench_args", nargs="*", help="arguments for bench_edit.py (after --)")
    args = parser.parse_args()
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    base = Path(tempfile.mkdtemp(prefix="factedit-base-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", str(base), revision], cwd=ROOT, check=True, capture_output=True
    )
    try:
        if (ROOT / "stats").is_dir():  # the statistics are not in git
            shutil.rmtree(base / "stats", ignore_errors=True)
            (base / "stats").symlink_to(ROOT / "stats")
        rows = []
        for round_ in range(args.rounds):
            before, after = run_bench(base, args.bench_args), run_bench(ROOT, args.bench_args)
            rows.append((before, after))
            print(f"round {round_ + 1}: {revision} {before:.3f} s, this tree {after:.3f} s", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print(f"\nbench_edit.py {' '.join(args.bench_args)}; rounds alternate, the base first\n")
    print(f"| round | {revision} s/edit | this tree s/edit | ratio |")
    print("|---|---:|---:|---:|")
    for index, (before, after) in enumerate(rows, 1):
        print(f"| {index} | {before:.3f} | {after:.3f} | {before / after:.2f}x |")
    before, after = median(r[0] for r in rows), median(r[1] for r in rows)
    print(f"| median | {before:.3f} | {after:.3f} | {before / after:.2f}x |")


if __name__ == "__main__":
    main()
