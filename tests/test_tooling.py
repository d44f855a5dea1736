"""The tooling agrees with itself: one ruff version in pyproject.toml, constraints.txt and the pre-commit config, and
CI runs the linter before the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_one_ruff_version_everywhere():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (pin,) = [re.fullmatch(r"ruff==([\d.]+)", d.split("#")[0].strip())[1] for d in dev if d.startswith("ruff")]
    constraints = re.search(r"^ruff==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M)[1]
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"]
    (rev,) = [repo["rev"] for repo in hooks if repo["repo"].endswith("/ruff-pre-commit")]
    assert pin == constraints == rev.lstrip("v")


def test_ci_lints_then_runs_the_readme_test_command():
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert commands.index("make lint") < commands.index("make test")
    assert "make test" in (ROOT / "README.md").read_text().split("\n## ")[0]
