"""Run every benchmark in turn and print all tables (Markdown), as recorded in docs/benchmarks.md.

    python benchmarks/run_all.py [--quick]

`--quick` lowers repeats and steps, for a check that the scripts run; its numbers are noisier.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_context_cache  # noqa: E402
import bench_full_size  # noqa: E402
import bench_guidance  # noqa: E402
import bench_memory  # noqa: E402
import bench_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick

    runs = [
        ("bench_step.py", bench_step.main, ["--repeats", "3" if quick else "7"]),
        ("bench_step.py", bench_step.main, ["--tokens", "1024", "--repeats", "3" if quick else "5"]),
        ("bench_context_cache.py", bench_context_cache.main,
         ["--steps", "1", "4"] + (["--repeats", "1"] if quick else [])),
        ("bench_guidance.py", bench_guidance.main, ["--repeats", "1", "--steps", "2"] if quick else []),
        ("bench_memory.py", bench_memory.main, ["--size", "512"] if quick else []),
        ("bench_full_size.py", bench_full_size.main, []),
    ]
    if not quick:
        runs[2] = ("bench_context_cache.py", bench_context_cache.main, [])
    for name, function, argv in runs:
        print(f"\n## {name} {' '.join(argv)}\n")
        function(argv)


if __name__ == "__main__":
    main()
