"""Print the project's dependencies (and those of the named extras) from pyproject.toml.

The images install these with ``pip install -c constraints.txt -r -`` before the source is
copied, so the dependency layer survives code changes and holds exactly what ``make install``
would install (``make`` installs ``.[dev,analysis]``). torch is left out: each image installs
its own build of the pinned version first (CPU wheel or CUDA wheel).

    python3 docker/requirements.py dev analysis > requirements.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(
            f"requirements.py: unknown extra(s) {', '.join(unknown)}; "
            f"pyproject.toml has {', '.join(sorted(optional))}"
        )
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += optional[extra]
    seen, out = set(), []
    for req in reqs:
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()
        if name != "torch" and req not in seen:
            seen.add(req)
            out.append(req)
    return out


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    # The checkout's docker/ (run from anywhere) or the image build's copy beside pyproject.toml.
    candidates = (here / "pyproject.toml", here.parent / "pyproject.toml")
    pyproject = next((p for p in candidates if p.exists()), None)
    if pyproject is None:
        raise SystemExit(f"requirements.py: no pyproject.toml in {here} or {here.parent}")
    print("\n".join(requirements(pyproject, sys.argv[1:])))
