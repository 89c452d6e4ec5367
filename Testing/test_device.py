"""Device choice: a missing GPU is reported as what is missing on *this* platform, with the fix."""

from __future__ import annotations

import platform

import pytest
import torch

from SRCSMSegmenterLib import device as device_mod
from SRCSMSegmenterLib.device import resolve_device
from SRCSMSegmenterLib.errors import SRCSMError


def _no_gpu(monkeypatch, system: str) -> None:
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)


@pytest.mark.parametrize("system", ["Linux", "Windows"])
def test_gpu_without_cuda_names_cuda_not_mps(monkeypatch, system):
    """"GPU" is what the Slicer module sends; on Linux/Windows it means CUDA, never Apple MPS."""
    _no_gpu(monkeypatch, system)
    with pytest.raises(SRCSMError) as exc:
        resolve_device("gpu")
    text = str(exc.value)
    assert "MPS" not in text and "Apple" not in text
    assert "CUDA" in text and system in text
    assert "--device cpu" in text and "CUDA build of PyTorch" in text


def test_gpu_on_mac_without_mps_names_mps(monkeypatch):
    _no_gpu(monkeypatch, "Darwin")
    with pytest.raises(SRCSMError, match="Apple MPS") as exc:
        resolve_device("gpu")
    assert "CUDA" not in str(exc.value) and "--device cpu" in str(exc.value)


def test_cuda_on_mac_and_mps_on_linux_say_the_platform_lacks_it(monkeypatch):
    _no_gpu(monkeypatch, "Darwin")
    with pytest.raises(SRCSMError, match="no CUDA on macOS"):
        resolve_device("cuda")
    _no_gpu(monkeypatch, "Linux")
    with pytest.raises(SRCSMError, match="only on macOS"):
        resolve_device("mps")


def test_gpu_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("gpu").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: True)
    assert resolve_device("gpu").type == "mps"
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available() or platform.system() == "Darwin",
                    reason="checks the message on a Linux/Windows machine without CUDA (as CI)")
def test_cli_gpu_on_this_machine_names_cuda(tmp_path, tiny_model, shared_data):
    import os
    import subprocess
    import sys

    image = shared_data / "Dataset502_AbdomenMRT2" / "imagesTr" / "chaos_02_0000.nii.gz"
    env = dict(os.environ, SRCSM_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "SRCSMSegmenterLib.cli", "segment", str(image),
                           str(tmp_path / "o.seg.nrrd"), "--model", str(tiny_model), "--device", "gpu",
                           "--progress", "none"], env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "CUDA" in proc.stderr and "MPS" not in proc.stderr
    assert not (tmp_path / "o.seg.nrrd").exists()


def _unet(norm: str) -> torch.nn.Module:
    from SRCSMSegmenterLib.network import build_network

    return build_network("srcsm_unet", {"channels": [4, 8], "dropout": 0.0, "norm": norm,
                                        "in_channels": 1, "out_channels": 3})


def test_memory_format_channels_last_only_where_it_is_faster():
    """CPU bf16: channels-last for the plain U-Net (oneDNN's fast convolutions), contiguous for the
    instance-norm U-Net of recipe v2 (its channels-last bf16 norm kernels are slower); GPUs and fp32
    always contiguous. The trainer, the inference and validation all ask with their network."""
    from SRCSMSegmenterLib.device import memory_format

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain, v2 = _unet("none"), _unet("instance")
    assert memory_format(cpu, "bf16", plain) == torch.channels_last_3d
    assert memory_format(cpu, "bf16") == torch.channels_last_3d
    assert memory_format(cpu, "bf16", v2) == torch.contiguous_format
    assert memory_format(cpu, "fp32", plain) == torch.contiguous_format
    assert memory_format(cuda, "bf16", plain) == torch.contiguous_format


def test_segmenter_runs_an_instance_norm_network_contiguous():
    """The layout the Segmenter puts its network in follows the network (same values either way)."""
    import types

    from SRCSMSegmenterLib.inference import Segmenter

    for norm, channels_last in (("instance", False), ("none", True)):
        package = types.SimpleNamespace(card=None, build_network=lambda norm=norm: _unet(norm))
        net = Segmenter(package, device="cpu", precision="fp32", strategy="sliding_window").network(
            torch.device("cpu"), "bf16")
        # a convolution with several input channels (one input channel is both layouts at once)
        weight = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1).weight
        assert weight.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
        assert weight.is_contiguous() != channels_last
