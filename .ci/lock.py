"""The tested-versions lock (constraints.txt): write it from an environment, check an environment against it, diff.

Why a pip constraints file and not a lock tool: the install is plain pip (the README's commands), the CPU build of
torch comes from this machine's disk first (uv and poetry do not look there), and a constraints file pins every
package, transitive ones included, without changing what the project declares (pyproject.toml keeps ranges).

    python .ci/lock.py write constraints.txt   # pin the current environment (what .ci/latest --write calls)
    python .ci/lock.py check constraints.txt   # exit 1 unless every installed version equals the lock (.ci/run)
    python .ci/lock.py diff constraints.txt    # what the current environment changes against the lock
    python .ci/lock.py unbounded dev,ray         # pyproject's requirements (+ those extras) without versions
"""

from __future__ import annotations

import datetime
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

# Not pinned: the project itself, and the installer's own tools (a venv brings its own; none is imported by tests).
UNPINNED = {"fastrm", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """name -> version of every distribution in this environment (local labels such as +cpu dropped)."""
    out = {}
    for d in metadata.distributions():
        name = canonical(d.metadata["Name"] or "")
        if name and name not in UNPINNED:
            out[name] = d.version.split("+", 1)[0]
    return dict(sorted(out.items()))


def read(path: Path) -> dict[str, str]:
    pins = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}:{n}: expected name==version, got {line!r}")
        pins[canonical(name)] = version.strip()
    return pins


def write(path: Path) -> None:
    pins = installed()
    head = (
        f"# Tested versions (pip constraints), written by `.ci/latest --write` on {datetime.date.today()} from a\n"
        f"# passing suite: Python {platform.python_version()}, {platform.machine()}, CPU torch. Install with\n"
        "#   pip install torch==2.13.0 && pip install -c constraints.txt -e '.[dev,ray,serve,trl,lora]'\n"
        "# Drop `-c constraints.txt` for the newest releases (pyproject.toml's ranges; untested combinations).\n"
    )
    path.write_text(head + "".join(f"{k}=={v}\n" for k, v in pins.items()))
    print(f"wrote {len(pins)} pins to {path}")


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if a != b:
            lines.append(f"  {k}: {a or '(not locked)'} -> {b or '(not installed)'}")
    return lines


def unbounded(extras: str) -> list[str]:
    """pyproject.toml's requirements and those of ``extras`` with every version bound removed (markers kept out):
    what .ci/latest installs to see the newest releases, bounds or not."""
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        reqs += project["optional-dependencies"][extra]
    names = []
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.-]+(\[[^\]]*\])?)", r)
        if m and m.group(1) not in names and canonical(m.group(1).split("[")[0]) != "fastrm":
            names.append(m.group(1))
    return names


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "check", "diff", "unbounded"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, path = argv[0], Path(argv[1])
    if cmd == "unbounded":
        print("\n".join(unbounded(argv[1])))
        return 0
    if cmd == "write":
        write(path)
        return 0
    changes = diff(read(path), installed())
    if cmd == "diff":
        print("\n".join(changes) if changes else "  (no version differs from the lock)")
        return 0
    if changes:
        print(f"installed versions differ from {path}:\n" + "\n".join(changes), file=sys.stderr)
        return 1
    print(f"every installed version equals {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
