"""Which wheels the GPU machine lacks for scaletrain's runtime: the list benchmarks/gpu/wheels.sh
downloads (and run.sh --dry-run checks).

    python benchmarks/gpu/wheel_list.py [--machine FILE] [--kinds KINDS.md]

Walks pyproject.toml's dependencies and, through the installed distributions' Requires-Dist
(markers evaluated for CPython 3.12 on Linux x86_64), everything they need; a package the
machine already has (with a version that satisfies every requirement seen, where its version is
known) is not carried and not walked further. torch is never carried: the machine's CUDA build
must stay. Packages that only optional features import are listed as skipped, with the feature.
Prints one line per package: `carry NAME==VERSION`, `present NAME ...` or `skip NAME (...)`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
MACHINE_FILE = Path(__file__).with_name("machine-packages.txt")

# Imported lazily by features the kit does not use; the machine's copy (if any) serves them.
OPTIONAL = {
    "torch": "the machine's CUDA build is used, never replaced",
    "wandb": "only logging.wandb=true imports it",
    "tensorboard": "only logging.tensorboard=true imports it",
    "matplotlib": "only `scaletrain plot` imports it",
    "transformers": "only hf export/import and SFT tokenizers import it",
}

# The environment a requirement's marker is evaluated in: the GPU machine's interpreter.
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


@dataclass
class Decision:
    """What to do with one distribution, and the requirements that led to it."""

    name: str
    action: str  # carry | present | skip
    version: str | None = None
    note: str = ""
    wanted: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.action == "carry":
            return f"carry {self.name}=={self.version}"
        return f"{self.action} {self.name} ({self.note})"


def read_machine(path: Path) -> dict[str, str | None]:
    """name -> version (None: present, version unknown) from `name [version]` lines."""
    packages: dict[str, str | None] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, *version = line.split()
            packages[canonicalize_name(name)] = version[0] if version else None
    return packages


def machine_from_kinds(kinds: Path) -> dict[str, str | None]:
    """The package list of the nvidia-h200 kind from the device tool's KINDS.md, with the
    versions its pip-list row gives."""
    text = kinds.read_text()
    listed = re.search(r"nvidia-h200: their image.*?Packages: (.*?)\.\s*$", text, re.S | re.M)
    if not listed:
        raise SystemExit(f"{kinds}: no 'Packages:' list for nvidia-h200")
    packages: dict[str, str | None] = {
        canonicalize_name(n.strip()): None for n in listed.group(1).split(",")
    }
    pip_row = re.search(r"One session's pip list[^:]*: (.*?) \|", text)
    for item in pip_row.group(1).split(",") if pip_row else []:
        name, _, version = item.strip().rpartition(" ")
        if canonicalize_name(name) in packages:
            packages[canonicalize_name(name)] = version
    return packages


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def _applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(TARGET_ENV)


def plan_wheels(
    machine: dict[str, str | None],
    roots: list[Requirement],
    installed=metadata.distribution,
) -> dict[str, Decision]:
    """Decide every distribution reachable from `roots` (`installed(name)` gives the local
    distribution whose version is carried and whose Requires-Dist is walked)."""
    decisions: dict[str, Decision] = {}
    queue = [r for r in roots if _applies(r)]
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        known = decisions.get(name)
        if known is not None:
            known.wanted.append(str(req))
            if known.action == "present" and not _satisfied(machine.get(name), known.wanted):
                decisions.pop(name)  # a later requirement rules the machine's version out
            else:
                continue
        if name in OPTIONAL:
            decisions[name] = Decision(name, "skip", note=OPTIONAL[name], wanted=[str(req)])
            continue
        wanted = [*(known.wanted if known else []), str(req)]
        if name in machine and _satisfied(machine[name], wanted):
            version = machine[name] or "version not listed"
            decisions[name] = Decision(name, "present", note=f"machine: {version}", wanted=wanted)
            continue
        dist = installed(req.name)
        decisions[name] = Decision(name, "carry", dist.version, wanted=wanted)
        queue += [r for r in map(Requirement, dist.requires or []) if _applies(r)]
    return decisions


def _satisfied(version: str | None, wanted: list[str]) -> bool:
    """Unknown versions are taken as fine; a known one must meet every specifier."""
    if version is None:
        return True
    parsed = Version(version)
    return all(Requirement(w).specifier.contains(parsed, prereleases=True) for w in wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machine", type=Path, default=MACHINE_FILE)
    parser.add_argument("--kinds", type=Path, help="refresh --machine from this KINDS.md first")
    args = parser.parse_args()
    if args.kinds:
        packages = machine_from_kinds(args.kinds)
        header = f"# nvidia-h200 python3 packages, from {args.kinds.name} (name [version])\n"
        body = "".join(f"{n} {v}\n" if v else f"{n}\n" for n, v in sorted(packages.items()))
        args.machine.write_text(header + body)
    decisions = plan_wheels(read_machine(args.machine), project_requirements())
    order = {"carry": 0, "present": 1, "skip": 2}
    for d in sorted(decisions.values(), key=lambda d: (order[d.action], d.name)):
        print(d.line())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
