"""The lockfiles (requirements/*.txt, pip-compile output): exact versions for CI and the image, inside the ranges
pyproject.toml gives users, covering every dependency; and this environment was installed from them."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s#;]+)")


def pins(name: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if match := PIN.match(line):
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(text) for text in project["optional-dependencies"][extra]]
    return requirements


@pytest.mark.parametrize(("lockfile", "extras"), [("dev.txt", ("dev", "otlp")), ("image.txt", ("otlp",))])
def test_every_declared_dependency_is_pinned_inside_its_range(lockfile: str, extras: tuple[str, ...]) -> None:
    locked = pins(lockfile)
    for requirement in declared(*extras):
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is not in requirements/{lockfile} (run pip-compile)"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"requirements/{lockfile} pins {name}=={locked[name]}, outside pyproject's {requirement.specifier}"
        )


def test_the_image_lock_agrees_with_the_dev_lock() -> None:
    """One version of each package everywhere: what the image runs is what the tests ran."""
    dev, image = pins("dev.txt"), pins("image.txt")
    assert {name: version for name, version in image.items() if dev.get(name) != version} == {}


def test_this_environment_was_installed_from_the_lock() -> None:
    """The README's test command installs with `-c requirements/dev.txt`: every locked package is at its pin."""
    wrong = {}
    for name, version in pins("dev.txt").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a platform-specific dependency that is not needed here
        if installed != version:
            wrong[name] = (installed, version)
    assert wrong == {}, wrong
