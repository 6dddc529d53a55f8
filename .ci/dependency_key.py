"""Print the requirement list (``--list``) or the cache key of one CI environment.

Two environments are tested (``--env``):

* ``newest``: the requirements of pyproject.toml as declared; pip resolves the newest releases.
* ``floor``: every ``name>=X`` pinned to ``name==X``, the oldest versions we declare (runtime and test
  dependencies), plus the pins in ``FLOOR_EXTRA`` for what pip cannot derive (torchvision must match torch).

The key hashes the list and the environment's Python version, so a cached environment is rebuilt exactly when
either changes. Runs on Python >= 3.11 (tomllib), whatever the environment's own Python.
"""

import argparse
import hashlib
import re
import sys
from pathlib import Path

import tomllib

# torchvision is timm's dependency, not ours: pin the release built for the torch floor.
FLOOR_EXTRA = ["torchvision==0.24.0"]


def requirements(env: str) -> list[str]:
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    declared = sorted(project["dependencies"] + project["optional-dependencies"]["test"])
    if env == "newest":
        return declared
    floors = [re.sub(r"\s*>=\s*", "==", r) for r in declared]
    unpinned = [r for r in floors if "==" not in r]
    if unpinned:
        sys.exit(f"dependency_key: no floor declared for {unpinned}")
    return floors + FLOOR_EXTRA


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", choices=["newest", "floor"], default="newest")
    parser.add_argument("--list", action="store_true", help="print the requirements, one a line")
    parser.add_argument(
        "--python",
        default=f"{sys.version_info[0]}.{sys.version_info[1]}",
        help="the environment's Python version, part of the key (default: this interpreter's)",
    )
    args = parser.parse_args()
    reqs = requirements(args.env)
    if args.list:
        print("\n".join(reqs))
    else:
        text = "\n".join(reqs) + f"\npython{args.python}"
        print(f"{args.env}-" + hashlib.sha256(text.encode()).hexdigest()[:16])


if __name__ == "__main__":
    main()
