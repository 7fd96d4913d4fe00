"""Workflow hygiene that CI enforces: Snakemake's linter and snakefmt's formatting."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_snakemake_lint_is_clean():
    result = run(sys.executable, "-m", "snakemake", "--lint", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_leaves_every_rule_file_unchanged():
    result = run(str(BIN / "snakefmt"), "--check", "Snakefile", "rules")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean():
    """ruff, configured in pyproject.toml, on the code we write (src, tests, bench, workflow scripts)."""
    result = run(str(BIN / "ruff"), "check", "src", "tests", "bench", "workflow/scripts")
    assert result.returncode == 0, result.stdout + result.stderr
