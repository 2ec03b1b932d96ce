"""Training batches drawn from one section each (data.batches: per_section, engine/batches.py)."""

import numpy as np
import pytest

from napari_comtip.errors import ConfigError


def test_per_section_batches_hold_one_section_each_and_every_spot_once():
    """data.batches per_section (engine/batches.py section_batches): each batch from one section,
    at most the batch size, every spot exactly once per epoch, the order seeded."""
    from napari_comtip.engine.batches import generator, section_batches

    groups = np.repeat([0, 1, 2], [130, 64, 10])
    a = section_batches(groups, 64, generator(3))
    b = section_batches(groups, 64, generator(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 5
    assert all(len(set(groups[x])) == 1 and 0 < len(x) <= 64 for x in a)
    spots = np.concatenate(a)
    assert sorted(spots.tolist()) == list(range(len(groups)))
    assert sorted(len(x) for x in a if groups[x[0]] == 0) == [43, 43, 44]  # near-equal sizes
    c = section_batches(groups, 64, generator(4))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_a_bad_batches_value_names_the_choices(tmp_path):
    from napari_comtip.engine.run_config import load_run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: micro\ndata:\n  batches: by_patient\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data.batches must be one of mixed, per_section, got .by_patient."):
        load_run_config(bad)
