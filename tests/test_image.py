"""The Docker image's torch (its base tag) against the floors of transformers and of pyproject.toml.

No Docker engine is needed: `make test-image-env` installs the package over that torch
version the way the Dockerfile does; this test keeps the three version claims consistent.
"""
import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def base_torch() -> Version:
    tag = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda", (ROOT / "Dockerfile").read_text(), re.M)
    assert tag, "the Dockerfile no longer starts from a pytorch/pytorch:<version>-cuda... image"
    return Version(tag.group(1))


def declared_floor(name: str) -> Version:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{name}>=([0-9.]+)(,.*)?", dep)
        if m:
            return Version(m.group(1))
    raise AssertionError(f"no {name}>= floor in pyproject.toml")


def transformers_torch_floor() -> Version:
    from transformers.dependency_versions_table import deps
    return Version(re.fullmatch(r"torch>=([0-9.]+)", deps["torch"]).group(1))


def test_base_image_torch_meets_transformers_and_pyproject_floors():
    torch = base_torch()
    assert torch >= transformers_torch_floor()
    assert torch >= declared_floor("torch")
    # The floor is what is tested: make test-floors and the image both run this torch.
    assert declared_floor("torch") == Version(f"{torch.major}.{torch.minor}")


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
