"""Packaging: runtime dependencies are what rescue/ imports, the lock agrees with pyproject.toml, and
``python -m rescue`` is the CLI (docs/decisions/0011-dependency-locking.md)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Imported by rescue/ only inside a guarded import, from an extra (absent from a range job's venv).
OPTIONAL_IMPORTS = {
    "opentelemetry": "the otel extra; rescue._tracing imports it only when tracing is configured",
}


def _imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for path in (ROOT / "rescue").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "rescue"}


def test_runtime_dependencies_are_exactly_what_rescue_imports() -> None:
    declared = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    extras = {
        canonicalize_name(Requirement(r).name)
        for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
        if name != "dev"
        for r in reqs
    }
    dists = packages_distributions()
    imported: set[str] = set()
    for module in _imported_top_level_modules() - set(OPTIONAL_IMPORTS):
        assert module in dists, f"rescue/ imports {module}, which no installed distribution provides"
        imported |= {canonicalize_name(d) for d in dists[module]}
    undeclared, unused = imported - declared - extras, declared - imported
    assert undeclared == set(), "rescue/ imports these: declare them in [project] dependencies"
    assert unused == set(), "declared runtime dependencies rescue/ never imports: move them to dev"


def _copy_project(tmp_path: Path) -> Path:
    (tmp_path / "requirements").mkdir()
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for lock in (ROOT / "requirements").glob("*.txt"):
        shutil.copy(lock, tmp_path / "requirements")
    return tmp_path


def _check_lock(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check-lock"), str(root)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_lock_agrees_with_pyproject() -> None:
    result = _check_lock(ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (
            '"cbor2>=5.6,<7",',
            '"cbor2>=5.6,<7", "left-pad>=1.0",',
            "asks for left-pad>=1.0 but requirements/dev.txt",
        ),
        ('"cbor2>=5.6,<7",', '"cbor2>=5.7,<7",', "requirements/lowest.txt pins cbor2==5.6.0"),
        ('"redis>=5.0,<9",', '"redis>=5.0,<8",', "asks for redis<8,>=5.0 but requirements/dev.txt pins 8"),
        ('    "cryptography>=42",', "", "requirements/runtime.txt still lists cryptography"),
        ('    "pytest>=8",', "", "requirements/dev.txt still lists pytest"),
        ('"cbor2>=5.6,<7",', '"cbor2>=5.6,<7", "attrs>=20",', "attrs, which requirements/dev.txt pins only"),
    ],
    ids=["added", "raised-floor", "lowered-cap", "removed-runtime", "removed-dev", "transitive-made-direct"],
)
def test_lock_check_names_what_was_not_relocked(tmp_path: Path, old: str, new: str, complaint: str) -> None:
    root = _copy_project(tmp_path)
    pyproject = root / "pyproject.toml"
    text = pyproject.read_text()
    assert old in text
    pyproject.write_text(text.replace(old, new, 1))
    result = _check_lock(root)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert "run `./run lock`" in result.stderr


def test_lock_check_wants_hashes_and_the_same_runtime_pins_as_dev(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    runtime = root / "requirements" / "runtime.txt"
    original = runtime.read_text()
    pinned = next(line for line in original.splitlines() if line.startswith("trio=="))
    runtime.write_text(original.replace(pinned, "trio==0.27.0 \\", 1))
    result = _check_lock(root)
    assert result.returncode == 1
    assert "requirements/runtime.txt pins trio==0.27.0, requirements/dev.txt 0." in result.stderr
    lines = original.splitlines()
    at = lines.index(pinned)
    while lines[at + 1].strip().startswith("--hash="):
        del lines[at + 1]
    lines[at] = lines[at].removesuffix(" \\")
    runtime.write_text("\n".join(lines) + "\n")
    result = _check_lock(root)
    assert result.returncode == 1
    assert "requirements/runtime.txt pins trio==" in result.stderr
    assert "without a --hash" in result.stderr


def _rescue_version() -> str:
    """``python -P -m rescue --version``: the installed package (-P: never the checkout we run in)."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "rescue", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_python_dash_m_rescue_is_the_cli(tmp_path: Path) -> None:
    assert _rescue_version().startswith("rescue ")
    key = tmp_path / "k.json"
    made = subprocess.run(
        [sys.executable, "-P", "-m", "rescue", "keygen", "--out", str(key)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert key.is_file()
    assert '"keys"' in made.stdout
    bad = subprocess.run(
        [sys.executable, "-P", "-m", "rescue", "nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("usage: rescue")


# --------------------------------------------------------------------------------------------------
# the compiled hot path (setup.py, rescue/_build.py, docs/decisions/0022-compiled-hot-path.md)


def _setup_py_compiled() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            return [ast.literal_eval(element) for element in node.value.elts]  # type: ignore[attr-defined]
    raise AssertionError("setup.py has no COMPILED list")


def test_setup_py_compiles_exactly_the_hot_path_rescue_reports() -> None:
    from rescue._build import HOT_PATH

    compiled = _setup_py_compiled()
    assert [path.removesuffix(".py").replace("/", ".") for path in compiled] == list(HOT_PATH)
    assert all((ROOT / path).is_file() for path in compiled)


def test_the_build_uses_the_mypy_the_lock_type_checks_with() -> None:
    """mypyc compiles what mypy checks: the build's pin is requirements/dev.txt's mypy."""
    requires = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    [mypy] = [r for r in requires if r.name == "mypy"]
    locked = next(
        line.split("==")[1].split()[0]
        for line in (ROOT / "requirements" / "dev.txt").read_text().splitlines()
        if line.startswith("mypy==")
    )
    assert str(mypy.specifier) == f"=={locked}"


def test_the_installed_build_is_what_the_install_asked_for() -> None:
    """CI installs the wheel (RESCUE_INSTALL=wheel): every hot-path module compiled, and the suite
    runs on those; the range jobs say which build they made (lowest pure, newest compiled); an
    editable dev install is pure Python; never a mix of stale and fresh."""
    from rescue import _build

    modules = _build.compiled_modules()
    version = _rescue_version()
    expected = os.environ.get("RESCUE_EXPECT_HOT_PATH")  # the range jobs: one of each build
    if expected:
        assert _build.describe() == expected
        assert version.strip().endswith(f"hot path {expected}")
    elif os.environ.get("RESCUE_INSTALL") == "wheel":
        assert modules == list(_build.HOT_PATH)
        assert version.strip().endswith("hot path compiled (mypyc)")
        assert _build.kind() == "compiled"  # the relay's beach_rescue_build_info{hot_path}
        import rescue.sessions._core as core

        assert not core.__file__.endswith(".py")  # what Python imported is the extension
    else:
        assert modules in ([], list(_build.HOT_PATH)), modules
        assert _build.kind() == ("compiled" if modules else "pure")


@pytest.mark.parametrize("how_many", ["all", "none", "one"])
def test_the_build_as_a_metric_label_and_as_words(how_many: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kind()`` (the relay's ``beach_rescue_build_info{hot_path}``) says what ``describe()`` says
    (``rescue --version``, ``/debug/stats``), in one word a dashboard can match."""
    from rescue import _build

    total = len(_build.HOT_PATH)
    compiled = {"all": total, "none": 0, "one": 1}[how_many]
    kind, described = {
        "all": ("compiled", "compiled (mypyc)"),
        "none": ("pure", "pure Python"),
        "one": ("partly", f"partly compiled: 1/{total}"),
    }[how_many]
    monkeypatch.setattr(_build, "compiled_modules", lambda: list(_build.HOT_PATH[:compiled]))
    assert (_build.kind(), _build.describe()) == (kind, described)


def test_no_compiled_coroutine_awaits_in_a_finally() -> None:
    """mypyc 2.4 re-raises, from an ``await`` inside ``finally``, the exception the coroutine's caller
    was handling (reproduced alone; ``close()`` turned a caller's ProtocolError into its own error).
    The compiled modules use ``except BaseException: ...; raise`` and a normal exit path instead."""
    offenders = []
    for path in _setup_py_compiled():
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Try | ast.TryStar):
                awaits = [
                    n for s in node.finalbody for n in ast.walk(s) if isinstance(n, ast.Await | ast.AsyncWith)
                ]
                offenders += [f"{path}:{n.lineno}" for n in awaits]
    assert offenders == []
