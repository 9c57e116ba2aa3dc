"""Classroom exercises shipped as package data: the wheel's contents and the lookup from an installed package."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from setuptools import find_namespace_packages

import lab.classroom
from lab.classroom import (EXERCISE_FILES, SOURCE_CLASSROOM_DIR, answer_key, classroom_root, copy_exercise,
                           list_exercises, load_exercise)
from lab.cli import main
from lab.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "classroom" / "class-eager-precopy"


def _setuptools_config() -> dict:
    with (REPO / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)["tool"]["setuptools"]


def test_pyproject_lists_every_package():
    config = _setuptools_config()
    found = find_namespace_packages(where=str(REPO), include=["lab", "lab.*"], exclude=["*.__pycache__"])
    assert sorted(config["packages"]) == sorted([*found, "lab.exercises"])
    assert config["package-dir"] == {"lab.exercises": "playbooks/classroom"}


def test_package_data_covers_exercise_files():
    patterns = _setuptools_config()["package-data"]["lab.exercises"]
    files = sorted(path.relative_to(SOURCE_CLASSROOM_DIR).as_posix()
                   for path in SOURCE_CLASSROOM_DIR.glob("*/*") if path.is_file())
    assert len(files) == len(list_exercises(SOURCE_CLASSROOM_DIR)) * len(EXERCISE_FILES)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


@pytest.fixture
def installed_lab(tmp_path, monkeypatch):
    """A package folder laid out as a wheel installs it, with one changed exercise, as the lookup's package."""
    package = tmp_path / "site" / "lab"
    exercises = package / "exercises"
    shutil.copytree(SOURCE_CLASSROOM_DIR / "01-eager-precopy", exercises / "01-eager-precopy")
    questions = exercises / "01-eager-precopy" / "questions.yaml"
    questions.write_text(questions.read_text(encoding="utf-8").replace(
        "en: Eager (all) against precopy", "en: Eager copy from package data"), encoding="utf-8")
    real_files = lab.classroom.resources.files
    monkeypatch.setattr(lab.classroom.resources, "files",
                        lambda name: package if name == "lab" else real_files(name))
    return exercises


def test_lookup_prefers_package_data(installed_lab):
    assert classroom_root() == installed_lab
    assert list_exercises() == ["01-eager-precopy"]
    assert load_exercise("01-eager-precopy").title["en"] == "Eager copy from package data"


def test_lookup_falls_back_to_source_tree():
    assert classroom_root() == SOURCE_CLASSROOM_DIR


def test_cli_list_and_key_from_package_data(installed_lab, tmp_path):
    listing = CliRunner().invoke(main, ["exercise", "list"])
    assert listing.exit_code == 0, listing.output
    assert listing.output == "01-eager-precopy\tEager copy from package data\n"
    results = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, results)
    key = CliRunner().invoke(main, ["exercise", "key", "01-eager-precopy", str(results), "--lang", "en"])
    assert key.exit_code == 0, key.output
    assert key.output.startswith("# Answer key: Eager copy from package data\n")


def test_unknown_exercise_lists_package_data(installed_lab):
    with pytest.raises(ConfigError, match="Use one of: 01-eager-precopy, or the path"):
        load_exercise("03-postcopy")


def test_wheel_ships_exercises_and_finds_them(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO / "lab", source / "lab", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(SOURCE_CLASSROOM_DIR, source / "playbooks" / "classroom")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; "
                            "print(build_meta.build_wheel('dist'))"],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "absent from the `packages` configuration" not in build.stderr
    wheel = source / "dist" / build.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {"lab/guest/init.sh", "lab/guest/workload/workload.c", "lab/guest/responder/responder.c"} <= names
    for exercise in list_exercises(SOURCE_CLASSROOM_DIR):
        for name in EXERCISE_FILES:
            assert f"lab/exercises/{exercise}/{name}" in names

    # Outside the source tree, with the unpacked wheel first on the path, as an installed package runs.
    results = tmp_path / FIXTURE.name
    shutil.copytree(FIXTURE, results)
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    script = ("import lab.classroom as c, lab.cli; print(c.__file__); print(c.classroom_root()); "
              "lab.cli.main(['exercise', 'key', '01-eager-precopy', %r, '--lang', 'en'])" % str(results))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    module_file, root, key = run.stdout.split("\n", 2)
    assert module_file == str(tmp_path / "site" / "lab" / "classroom.py")
    assert root == str(tmp_path / "site" / "lab" / "exercises")
    assert key.strip() == answer_key("01-eager-precopy", results, lang="en").strip()


def test_copy_writes_exercise_files(tmp_path):
    target = tmp_path / "work" / "ex3"
    written = copy_exercise("03-postcopy", target)
    assert [path.name for path in written] == list(EXERCISE_FILES)
    for name in EXERCISE_FILES:
        assert (target / name).read_bytes() == (SOURCE_CLASSROOM_DIR / "03-postcopy" / name).read_bytes()


def test_copy_rejects_existing_files(tmp_path):
    (tmp_path / "guide.md").write_text("my notes", encoding="utf-8")
    with pytest.raises(ConfigError, match="guide.md already exists"):
        copy_exercise("03-postcopy", tmp_path)
    assert (tmp_path / "guide.md").read_text(encoding="utf-8") == "my notes"
    assert not (tmp_path / "playbook.yaml").exists()
    copy_exercise("03-postcopy", tmp_path, overwrite=True)
    assert (tmp_path / "guide.md").read_bytes() == (SOURCE_CLASSROOM_DIR / "03-postcopy" / "guide.md").read_bytes()


def test_copy_rejects_file_as_target(tmp_path):
    target = tmp_path / "file"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a folder"):
        copy_exercise("03-postcopy", target)


def test_cli_copy_then_run_command(tmp_path):
    target = tmp_path / "ex"
    result = CliRunner().invoke(main, ["exercise", "copy", "06-flushing", str(target)])
    assert result.exit_code == 0, result.output
    assert f"migrlab run {target / 'playbook.yaml'}" in result.output
    assert (target / "guia.md").is_file()
    again = CliRunner().invoke(main, ["exercise", "copy", "06-flushing", str(target)])
    assert again.exit_code == 1
    assert "already exists" in again.output
