"""The allow-list of a deployment run's files: inside it a spec resolves, outside it (directly,
through `..` or through a symbolic link) it is refused in one line naming the list."""

from __future__ import annotations

import os

import pytest

from nllflow.errors import InputError
from nllflow.spec import ExperimentSpec, SpecFile, resolve_spec


def _spec(path: str, test_path: str | None = None) -> ExperimentSpec:
    data = {"path": path, "column": "y", **({"test_path": test_path} if test_path else {})}
    return ExperimentSpec.model_validate({"name": "access", "family": "normal", "data": data})


@pytest.fixture
def folders(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    for folder in (allowed, outside):
        (folder / "d.csv").write_text("y\n1\n2\n3\n")
    (allowed / "link.csv").symlink_to(outside / "d.csv")
    monkeypatch.setenv("NLLFLOW_DATA_DIRS", str(allowed))
    return allowed, outside


def test_paths_inside_the_allow_list_resolve(folders):
    allowed, _ = folders
    spec = _spec(str(allowed / "d.csv"))
    assert resolve_spec(spec, restricted=True) is spec


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "test_path"])
def test_paths_out_of_the_allow_list_are_refused_in_one_line(folders, where):
    allowed, outside = folders
    paths = {
        "outside": (str(outside / "d.csv"), None),
        "dotdot": (str(allowed / ".." / "outside" / "d.csv"), None),
        "symlink": (str(allowed / "link.csv"), None),
        "test_path": (str(allowed / "d.csv"), str(outside / "d.csv")),
    }[where]
    spec = _spec(*paths)
    assert resolve_spec(spec) is spec  # the CLI and the API read what their user names
    with pytest.raises(InputError) as refused:
        resolve_spec(spec, restricted=True)
    message = str(refused.value)
    assert "\n" not in message and f"may be read only below {allowed}" in message
    assert "NLLFLOW_DATA_DIRS" in message and str(outside / "d.csv") in message


def test_a_spec_file_outside_the_allow_list_is_not_read(folders, tmp_path):
    _, outside = folders
    (outside / "spec.yaml").write_text("this file must not be read: [")
    with pytest.raises(InputError, match="a deployment run's spec file may be read only below"):
        resolve_spec(SpecFile(file=str(outside / "spec.yaml")), restricted=True)


def test_the_default_list_is_the_working_directory_and_nllflows_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NLLFLOW_DATA_DIRS", raising=False)
    monkeypatch.setenv("NLLFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.csv").write_text("y\n1\n2\n")
    resolve_spec(_spec("d.csv"), restricted=True)
    with pytest.raises(InputError, match=f"below {tmp_path}{os.pathsep}{tmp_path / 'home'}"):
        resolve_spec(_spec("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd"), restricted=True)
