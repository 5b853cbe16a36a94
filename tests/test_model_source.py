"""The packaged model's converted cache is keyed on the model, not on where it is installed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from automation.backends.local.model_source import converted_dir, resolve_model_dir
from automation.errors import BackendError
from automation.spec import ModelSpec


def install_fake_package(site: Path, gguf_bytes: bytes, version: str = "1.0") -> Path:
    """A package `fake-model` that ships a .gguf file, installed into the folder `site`."""
    (site / "fake_model").mkdir(parents=True)
    (site / "fake_model" / "__init__.py").write_text("")
    (site / "fake_model" / "model.gguf").write_bytes(gguf_bytes)
    dist = site / f"fake_model-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-model\nVersion: {version}\n")
    return site / "fake_model" / "model.gguf"


@pytest.fixture
def on_path(monkeypatch):
    """Put one site folder at a time first on sys.path (a venv at one path, then at another)."""
    added: list[str] = []

    def use(site: Path) -> None:
        for folder in added:
            monkeypatch.setattr(sys, "path", [p for p in sys.path if p != folder])
        added.append(str(site))
        monkeypatch.syspath_prepend(str(site))
        sys.modules.pop("fake_model", None)
        importlib.invalidate_caches()

    yield use
    sys.modules.pop("fake_model", None)


def test_the_same_model_at_two_paths_has_one_cache_and_a_different_file_another(workspace, tmp_path, on_path):
    model = ModelSpec(name="fake", package="fake-model")
    first = install_fake_package(tmp_path / "runner-a" / "site-packages", b"GGUF the same bytes")
    second = install_fake_package(tmp_path / "runner-b" / "elsewhere" / "site-packages", b"GGUF the same bytes")
    other = install_fake_package(tmp_path / "runner-c" / "site-packages", b"GGUF another model, longer")
    newer = install_fake_package(tmp_path / "runner-d" / "site-packages", b"GGUF the same bytes", version="2.0")

    on_path(first.parents[1])
    cache = converted_dir("fake", "fake-model", first)
    # As if converted on the first runner and restored by actions/cache on the second.
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")

    on_path(second.parents[1])
    assert converted_dir("fake", "fake-model", second) == cache
    # Found, not converted: the fake .gguf could not be converted, so a miss would raise.
    assert resolve_model_dir(model) == cache

    on_path(other.parents[1])
    assert converted_dir("fake", "fake-model", other) != cache
    on_path(newer.parents[1])
    assert converted_dir("fake", "fake-model", newer) != cache


def test_a_miss_converts_and_a_file_that_is_no_model_fails_clearly(workspace, tmp_path, on_path):
    on_path(install_fake_package(tmp_path / "site", b"not a gguf file").parents[1])
    with pytest.raises(BackendError, match="converting .*model.gguf failed"):
        resolve_model_dir(ModelSpec(name="fake", package="fake-model"))
