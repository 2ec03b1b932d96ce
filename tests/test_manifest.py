"""The npe2 manifest is valid and every command it names resolves to a callable."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

MANIFEST = Path(__file__).resolve().parents[1] / "src" / "napari_comtip" / "napari.yaml"


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_file(MANIFEST)


def test_manifest_validates(manifest):
    assert manifest.name == "napari-comtip"
    c = manifest.contributions
    assert [w.display_name for w in c.widgets] == ["Predict expression", "Pretrain CoMTIP"]
    assert [s.key for s in c.sample_data] == ["demo"]
    assert c.readers and c.readers[0].accepts_directories
    for pat in ("*.h5ad", "*.svs", "*.tif", "*.jpg"):
        assert pat in c.readers[0].filename_patterns


def test_every_command_resolves(manifest):
    ids = {cmd.id for cmd in manifest.contributions.commands}
    used = {r.command for r in manifest.contributions.readers} | {s.command for s in manifest.contributions.sample_data} \
        | {w.command for w in manifest.contributions.widgets}
    assert used <= ids
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        obj = import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), cmd.python_name


def test_entry_point_is_installed():
    """napari finds the manifest through the package's entry point."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "napari-comtip"]
    assert eps and eps[0].value == "napari_comtip:napari.yaml"
    pm = npe2.PluginManager()
    pm.discover()
    assert "napari-comtip" in pm._manifests
