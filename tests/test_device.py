"""Device choice: only devices that exist are offered; an unavailable one is a one-line InputError."""

from __future__ import annotations

import pytest
import torch

from napari_comtip.engine.device import available_devices, describe_device, resolve_device
from napari_comtip.errors import ComtipError, InputError


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    auto = resolve_device("auto")
    assert resolve_device(None) == auto
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        assert auto.type == "mps"
    else:
        assert auto == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_available_devices_lists_only_existing_ones():
    devs = available_devices()
    assert devs[:2] == ["auto", "cpu"]
    cuda = [d for d in devs if d.startswith("cuda")]
    assert len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for d in devs:  # every offered choice resolves
        resolve_device(d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_unavailable_cuda_is_a_one_line_input_error(name):
    with pytest.raises(InputError) as exc:
        resolve_device(name)
    msg = str(exc.value)
    assert "\n" not in msg and name in msg and "--device cpu" in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_index_beyond_count_is_refused():
    n = torch.cuda.device_count()
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InputError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")
    assert describe_device(torch.device("cuda", 0)).startswith("cuda:0 (")


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x", "cpu:0"])
def test_unknown_device_names(name):
    with pytest.raises(ComtipError, match="unknown device"):
        resolve_device(name)


def test_describe_cpu():
    assert describe_device(torch.device("cpu")).startswith("cpu (")


@pytest.mark.skipif(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                    reason="checks the error on a machine without MPS")
def test_unavailable_mps():
    with pytest.raises(InputError, match="'mps' is not available"):
        resolve_device("mps")
    assert "mps" not in available_devices()
