"""Print the cache key (or, with --list, the requirement list) of the CI virtual environment.

The key hashes the runtime and test dependencies declared in pyproject.toml plus the Python version,
so the cached environment is rebuilt exactly when the dependency list changes.
"""

import hashlib
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
requirements = sorted(project["dependencies"] + project["optional-dependencies"]["test"])
if "--list" in sys.argv:
    print("\n".join(requirements))
else:
    text = "\n".join(requirements) + f"\npython{sys.version_info[0]}.{sys.version_info[1]}"
    print(hashlib.sha256(text.encode()).hexdigest()[:16])
