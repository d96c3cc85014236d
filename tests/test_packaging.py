"""The package as users install it: a wheel built from a clean copy of the working tree holds one
top-level import package, `nllflow`; installed from that wheel, `python -m nllflow` answers as the
console script does; prefect.yaml's entrypoints load their flows; the suite imports only `nllflow`."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps` in a copy of what a clean clone of this working tree holds (the
    tracked files and the untracked ones git does not ignore: no build/, no egg-info)."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "clone"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.split(b"\0")
    for name in filter(None, (entry.decode() for entry in listed)):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not there
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-q", "-w", str(folder / "dist")],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    (built,) = (folder / "dist").glob("nllflow-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package_nllflow(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
        top_level = {name.split("/", 1)[0] for name in names}
    (dist_info,) = [name for name in top_level if name.endswith(".dist-info")]
    assert top_level == {"nllflow", dist_info} and dist_info.startswith("nllflow-")
    # the folders on disk are the subpackages: tasks/ is nllflow, flows/ is nllflow.flows
    for module in ("__init__.py", "__main__.py", "api.py", "report.py", "families/continuous.py", "flows/cli.py"):
        assert f"nllflow/{module}" in names
    assert not any(name.startswith(("nllflow/tests/", "tasks/", "flows/")) for name in names)
    assert "nllflow = nllflow.flows.cli:main" in scripts


def test_python_m_nllflow_from_the_installed_wheel_is_the_console_script(wheel, tmp_path):
    from nllflow.families import FAMILIES, family_names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_SECONDS,
    )
    # the wheel's nllflow first on the path; its dependencies from this environment
    env = {**os.environ, "PYTHONPATH": str(target), "NLLFLOW_HOME": str(tmp_path / "home")}
    probe = subprocess.run(
        [sys.executable, "-c", "import nllflow; print(nllflow.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,
    )
    assert Path(probe.stdout.strip()).parent == target / "nllflow"
    as_module = subprocess.run(
        [sys.executable, "-m", "nllflow", "families"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    script = subprocess.run(
        [str(Path(sys.executable).with_name("nllflow")), "families"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert as_module.returncode == script.returncode == 0, as_module.stderr + script.stderr
    assert as_module.stdout == script.stdout
    listed = [line.split()[0] for line in as_module.stdout.splitlines()]
    assert listed == family_names() and len(listed) >= 20
    assert all(
        line.split()[1] == ("discrete" if FAMILIES[line.split()[0]].discrete else "continuous")
        for line in as_module.stdout.splitlines()
    )
    bad = subprocess.run(
        [sys.executable, "-m", "nllflow", "fit", "--data", "nowhere.csv", "--column", "x", "--family", "normal"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("nllflow: error: ") and len(bad.stderr.splitlines()) == 1


def test_prefect_yaml_entrypoints_load_their_flows():
    from prefect.flows import load_flow_from_entrypoint

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert deployments
    for deployment in deployments:
        path, name = deployment["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == name  # the flows are named as their functions: fit, sweep
        assert (ROOT / path).is_file()


def test_the_suite_imports_only_nllflow():
    """No test imports the folders `tasks` or `flows` as top-level modules: only what the wheel
    installs (`nllflow...`), so the suite tests the installed package."""
    offending = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            offending += [
                f"{path.relative_to(ROOT)}:{node.lineno} {m}" for m in modules if m.split(".")[0] in ("tasks", "flows")
            ]
    assert offending == []
    # and the README's examples import nllflow too
    readme = (ROOT / "README.md").read_text()
    assert "from tasks" not in readme and "import tasks" not in readme and "from flows" not in readme
