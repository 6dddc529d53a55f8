"""Import cost of ``deit_registry`` against ``torch``, and what registering with timm adds to ``import timm``.

Each statement runs in a fresh interpreter ``--runs`` times (wall clock of the whole process, minus an empty
interpreter's start-up), and once under ``-X importtime`` for the self-reported cumulative import time; the
registration with timm is timed inside a process that has already imported timm::

    python benchmarks/import_time.py --runs 7
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "import deit_registry": "import deit_registry",
    "import torch": "import torch",
    "import timm": "import timm",
    "import deit_registry, timm (registers)": "import deit_registry; import timm",
}


def wall(code: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def importtime(module: str) -> float:
    """Cumulative microseconds ``-X importtime`` reports for ``module`` (seconds)."""
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    pattern = re.compile(rf"^import time:\s+\d+ \|\s+(\d+) \| {re.escape(module)}$", re.M)
    return int(pattern.findall(err)[-1]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base = wall("pass", args.runs)
    print(
        f"python {sys.version.split()[0]}, {args.runs} runs each, median wall clock minus start-up ({base:.3f} s)"
    )
    for label, code in STATEMENTS.items():
        print(f"  {label:<40} {wall(code, args.runs) - base:7.3f} s")
    for module in ("deit_registry", "torch"):
        print(f"  -X importtime cumulative {module:<24} {importtime(module):7.3f} s")
    # with timm already imported, `import deit_registry` registers at once: the whole cost of registration
    probe = "import time, timm; t = time.perf_counter(); import deit_registry; print(time.perf_counter() - t)"
    costs = [
        float(
            subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        )
        for _ in range(args.runs)
    ]
    print(f"  {'import deit_registry after timm (registers)':<40} {statistics.median(costs):7.3f} s")


if __name__ == "__main__":
    main()
