"""Packaging consistency: art_queen imports without torch, and setup.py declares what the tox matrix tests."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import art_queen

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_PY = REPO_ROOT / "setup.py"
TOX_INI = REPO_ROOT / "tox.ini"
TORCH_PIN = "torch==2.13.0"
# Test tools and build requirements that the torch-free tox environments install besides the runtime dependencies.
NOTORCH_TOOLING = {"pytest", "hypothesis", "setuptools"}


def _run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (no state shared with this test session) from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def _setup_call_keywords() -> dict[str, ast.expr]:
    """The keyword arguments of the ``setup(...)`` call in setup.py, as AST nodes."""
    tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setup":
            return {keyword.arg: keyword.value for keyword in node.keywords if keyword.arg is not None}
    raise AssertionError("setup.py has no setup(...) call.")


def _setup_literal(name: str):
    """A literal keyword argument of ``setup(...)``; a module-level name it refers to is resolved."""
    value = _setup_call_keywords()[name]
    if isinstance(value, ast.Name):
        tree = ast.parse(SETUP_PY.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == value.id for target in node.targets
            ):
                return ast.literal_eval(node.value)
        raise AssertionError(f"setup.py does not assign {value.id} at module level.")
    return ast.literal_eval(value)


def _install_requires() -> dict[str, Requirement]:
    return {Requirement(line).name.lower(): Requirement(line) for line in _setup_literal("install_requires")}


def _expand(pattern: str) -> list[str]:
    """Expand tox's generative names: ``py{310,311}-x`` gives ``py310-x`` and ``py311-x``."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[part] if index % 2 == 0 else part.split(",") for index, part in enumerate(parts)]
    return ["".join(combination).strip() for combination in itertools.product(*choices)]


def _tox_config() -> configparser.ConfigParser:
    if not TOX_INI.exists():
        pytest.skip("tox.ini is not part of this installation (tests run outside a checkout).")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(TOX_INI, encoding="utf-8")
    return parser


def _tox_env_sections() -> dict[str, configparser.SectionProxy]:
    """Every environment name tox.ini defines, mapped to the section that defines it."""
    parser = _tox_config()
    envs = {}
    for section in parser.sections():
        if section.startswith("testenv:"):
            for name in _expand(section[len("testenv:") :]):
                envs[name] = parser[section]
    return envs


def _factor_condition_holds(condition: str, factors: set[str]) -> bool:
    """tox's factor conditions: ``a,b`` is a or b, ``a-b`` is a and b, ``!a`` is not a."""
    return any(
        all((term[1:] not in factors) if term.startswith("!") else (term in factors) for term in alternative.split("-"))
        for alternative in condition.split(",")
    )


def _tox_deps(section: configparser.SectionProxy, env_name: str) -> list[str]:
    """The deps lines of an environment, with tox factor conditions (``art118: ...``) applied for ``env_name``."""
    factors = set(env_name.split("-"))
    deps = []
    for line in section.get("deps", "").splitlines():
        line = line.strip()
        conditional = re.fullmatch(r"([\w!,-]+):\s+(.+)", line)
        if conditional:
            if not _factor_condition_holds(conditional.group(1), factors):
                continue
            line = conditional.group(2).strip()
        if line:
            deps.append(line)
    return deps


def _tested_python_versions() -> set[Version]:
    """The interpreters the tox matrix names (pyXYZ factors; every other environment runs on Python 3.11)."""
    versions = set()
    for name in _tox_env_sections():
        match = re.match(r"py(\d)(\d+)(?:-|$)", name)
        versions.add(Version(f"{match.group(1)}.{match.group(2)}") if match else Version("3.11"))
    return versions


def _floor(requirement: Requirement) -> Version:
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "~=", "==")]
    assert floors, f"{requirement} declares no lower bound."
    return max(floors)


def test_import_works_without_torch():
    # A None entry in sys.modules makes `import torch` raise ImportError, as if torch were not installed.
    result = _run_python("import sys; sys.modules['torch'] = None; import art_queen; print(art_queen.__version__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == art_queen.__version__


def test_import_is_lazy():
    result = _run_python(
        "import sys, art_queen; heavy = sorted({'torch', 'art', 'sklearn', 'matplotlib'} & set(sys.modules)); "
        "print(','.join(heavy))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"import art_queen loaded {result.stdout.strip()}"


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        art_queen.NoSuchThing  # noqa: B018


def test_version_is_pep440_and_matches_installed_metadata():
    version = Version(art_queen.__version__)
    assert str(version) == art_queen.__version__
    try:
        installed = importlib.metadata.version("art_queen")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("art_queen is imported from the source tree without being installed.")
    assert installed == art_queen.__version__, "the installed metadata is stale: reinstall the package"


def test_python_requires_matches_tox_interpreters():
    python_requires = SpecifierSet(_setup_literal("python_requires"))
    tested = _tested_python_versions()
    assert all(version in python_requires for version in tested), (python_requires, sorted(tested))
    oldest = min(tested)
    below_oldest = Version(f"{oldest.major}.{oldest.minor - 1}")
    assert below_oldest not in python_requires, f"python_requires {python_requires} admits untested {below_oldest}"


def test_classifiers_name_exactly_the_tested_interpreters():
    classifiers = _setup_literal("classifiers")
    declared = {
        Version(line.rsplit("::", 1)[1].strip())
        for line in classifiers
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", line)
    }
    assert declared == _tested_python_versions()


def test_art_and_numpy_floors_are_the_oldest_tested_versions():
    requires = _install_requires()
    envs = _tox_env_sections()
    art_versions = {Version(f"1.{m.group(1)}") for m in map(re.compile(r"-art1(\d\d)\b").search, envs) if m}
    numpy_versions = {
        Version(f"{m.group(1)}.{m.group(2) or 0}") for m in map(re.compile(r"-np(\d)(\d*)\b").search, envs) if m
    }
    assert art_versions and numpy_versions
    assert _floor(requires["adversarial-robustness-toolbox"]) == min(art_versions)
    assert _floor(requires["numpy"]) == min(numpy_versions)


def test_torch_is_pinned_wherever_tox_may_install_it():
    for name, section in _tox_env_sections().items():
        deps = _tox_deps(section, name)
        torch_lines = [line for line in deps if re.match(r"torch\b", line)]
        assert all(line == TORCH_PIN for line in torch_lines), (name, torch_lines)
        installs_package = section.get("package", "wheel").strip() != "skip"
        if installs_package:
            # The package requires torch: its pin must come first and hold while tox installs the package's deps.
            assert torch_lines == [TORCH_PIN], f"{name} installs art_queen without {TORCH_PIN} in deps"
            assert section.get("constrain_package_deps", "false").strip() == "true", name


def test_notorch_environments_install_every_runtime_dependency_but_torch():
    expected = {name: str(req.specifier) for name, req in _install_requires().items() if name != "torch"}
    envs = {name: section for name, section in _tox_env_sections().items() if name.endswith("-notorch")}
    assert envs, "tox.ini defines no torch-free environments"
    for name, section in envs.items():
        deps = {Requirement(line).name.lower(): str(Requirement(line).specifier) for line in _tox_deps(section, name)}
        assert "torch" not in deps
        runtime = {dep: spec for dep, spec in deps.items() if dep not in NOTORCH_TOOLING}
        assert runtime == expected, name


def test_tox_factor_expansion_and_conditions():
    # The helpers above must read tox.ini the way tox does, or the checks built on them prove nothing.
    assert _expand("py{310,311}-art{118,120}") == ["py310-art118", "py310-art120", "py311-art118", "py311-art120"]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string("[testenv:x]\ndeps =\n    torch==2.13.0\n    art118: a~=1.18.0\n    art120: a~=1.20.0\n")
    assert _tox_deps(parser["testenv:x"], "py311-art118-np2") == ["torch==2.13.0", "a~=1.18.0"]
    assert _factor_condition_holds("art118,art119", {"py311", "art119"})
    assert not _factor_condition_holds("py311-np126", {"py311", "np2"})
    assert _factor_condition_holds("!notorch", {"py311", "np2"})
