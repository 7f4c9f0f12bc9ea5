"""The JAX versions the package declares, builds against and refuses.

One wheel serves the declared range because its handlers are built against the oldest JAX's FFI
headers (pyproject.toml's build-system pin); the import refuses a jaxlib older than those headers
with one error naming both versions, before any handler is registered.
"""

import pathlib
import re
import tomllib

import jax
import jaxlib.version
import pytest

from jax_flash_mla import _jax_flash_mla, _registration

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject():
    return tomllib.loads(PYPROJECT.read_text())


def pinned(requirements, name):
    """The version a requirement list pins NAME to with ==."""
    for requirement in requirements:
        match = re.fullmatch(rf"{name}\s*==\s*([\w.]+)", requirement)
        if match:
            return match.group(1)
    raise AssertionError(f"no {name}==VERSION in {requirements}")


def jax_bounds(dependencies):
    """(lower, upper) of the jax requirement 'jax>=LOWER,<UPPER'."""
    for requirement in dependencies:
        match = re.fullmatch(r"jax\s*>=\s*([\w.]+)\s*,\s*<\s*([\w.]+)", requirement)
        if match:
            return match.group(1), match.group(2)
    raise AssertionError(f"no jax>=LOWER,<UPPER in {dependencies}")


def test_version_tuple():
    assert _registration.version_tuple("0.8.0") == (0, 8, 0)
    assert _registration.version_tuple("0.12.0.1") == (0, 12, 0, 1)
    assert _registration.version_tuple("0.8.0.dev20250101") == (0, 8, 0)
    assert _registration.version_tuple("0.9.0rc1") == (0, 9, 0)
    assert _registration.version_tuple("0.10.2") > _registration.version_tuple("0.9.2")


def test_older_runtime_is_refused_naming_both_versions():
    with pytest.raises(ImportError) as excinfo:
        _registration.check_runtime_jaxlib("0.12.0", "0.11.2", (0, 5))
    message = str(excinfo.value)
    assert "jaxlib 0.12.0" in message and "jaxlib 0.11.2" in message
    assert "XLA FFI API 0.5" in message


@pytest.mark.parametrize("running", ["0.8.0", "0.8.1", "0.12.0.1"])
def test_same_or_newer_runtime_is_accepted(running):
    _registration.check_runtime_jaxlib("0.8.0", running, (0, 1))


def test_installed_handlers_were_built_for_this_runtime():
    built = _jax_flash_mla.BUILT_WITH_JAXLIB
    assert _registration.version_tuple(built) <= _registration.version_tuple(
        jaxlib.version.__version__)
    major, minor = _jax_flash_mla.XLA_FFI_API_VERSION
    assert major == 0 and minor >= 1


def test_build_pins_the_oldest_admitted_jax():
    config = pyproject()
    lower, _ = jax_bounds(config["project"]["dependencies"])
    build_requires = config["build-system"]["requires"]
    assert pinned(build_requires, "jax") == lower
    assert pinned(build_requires, "jaxlib") == lower


def test_running_jax_is_in_the_declared_range():
    lower, upper = jax_bounds(pyproject()["project"]["dependencies"])
    running = _registration.version_tuple(jax.__version__)
    assert _registration.version_tuple(lower) <= running < _registration.version_tuple(upper)
