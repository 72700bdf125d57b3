"""The locks (lock/*.txt) agree with pyproject.toml and with each other.

Every environment the project creates installs a lock (scripts/venv-lib.sh, deploy/Dockerfile);
pyproject.toml keeps ranges. A range changed without `make lock` would leave CI installing a set
the package no longer declares: these tests name the package and the command that fixes it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==(\S+)(?: ;.*)?(?: \\)?$", re.M)

# lock file -> the extras of pyproject.toml it installs (besides the base dependencies)
PROJECT_LOCKS = {
    "test.txt": ("engine", "dashboards", "test"),
    "engine.txt": ("engine", "dashboards"),
    "grafana.txt": ("dashboards", "grafana"),
    "image.txt": (),
}
ENV_3_11 = {**default_environment(), "python_version": "3.11", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64"}


def pins(name: str) -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in PIN.findall((LOCK / name).read_text())}


def requirements(extras: tuple[str, ...]) -> list[Requirement]:
    deps = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        deps += PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(d) for d in deps]


@pytest.mark.parametrize("lock", sorted(PROJECT_LOCKS))
def test_lock_pins_every_declared_dependency_within_its_range(lock: str) -> None:
    pinned = pins(lock)
    env = {**ENV_3_11, "python_version": "3.12"} if lock == "image.txt" else ENV_3_11
    stale = []
    for req in requirements(PROJECT_LOCKS[lock]):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        version = pinned.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(Version(version), prereleases=True):
            stale.append(f"{req} (locked: {version})")
    assert not stale, f"lock/{lock} is stale for {stale}: run `make lock`"


@pytest.mark.parametrize("lock", sorted(p.name for p in LOCK.glob("*.txt")))
def test_every_pin_carries_a_hash(lock: str) -> None:
    text = (LOCK / lock).read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
    unhashed = [b.split()[0] for b in blocks if "==" in b.split()[0] and "--hash=sha256:" not in b]
    assert not unhashed, f"lock/{lock}: pins without a hash {unhashed}"


def test_venv_locks_share_one_version_per_package() -> None:
    test = pins("test.txt")
    for other in ("engine.txt", "grafana.txt"):
        differ = {n: (v, test[n]) for n, v in pins(other).items() if n in test and test[n] != v}
        assert not differ, f"lock/{other} and lock/test.txt disagree on {differ}: make lock"
    assert set(pins("engine.txt")) <= set(test), "the test venv must hold the engine venv"


def test_torch_is_the_local_cpu_build_everywhere_it_is_locked() -> None:
    for lock in ("test.txt", "engine.txt", "vllm.txt"):
        assert pins(lock)["torch"] == "2.13.0+cpu", lock
    assert "torch" not in pins("image.txt"), "the sidecar image carries no torch"
    # the CUDA builds that broke `import vllm` stay out of its lock
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins("vllm.txt"))


def test_setup_scripts_install_only_from_the_locks() -> None:
    scripts = {p.name: p.read_text() for p in (ROOT / "scripts").glob("setup*.sh")}
    for name, text in scripts.items():
        assert not re.search(r"\bpip\"? install\b", text), f"{name} installs outside a lock"
        assert "venv_sync" in text or "setup.sh" in text, name
    lib = (ROOT / "scripts" / "venv-lib.sh").read_text()
    assert "pip sync" in lib and "--require-hashes" in lib
    docker = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes -r lock/image.txt" in docker
