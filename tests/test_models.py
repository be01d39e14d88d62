"""load_model: offline loading, checksums, clear errors; weights_fingerprint; real accuracy."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch

from dsm_lite.assets import AssetNotFoundError, ChecksumError, OfflineError
from dsm_lite.models import (DEFAULT_MODEL, book_dtype, NotAViTError, UnknownModelError, load_model,
                             pick_device, predict, topk_accuracy, weights_fingerprint)

WEIGHTS = f"weights/{DEFAULT_MODEL}.safetensors"
FINGERPRINT = "7567dd8b4b23"  # of the offline ViT-Ti weights; the hub copy should match


@pytest.fixture(scope="module")
def model(real_assets: Path) -> torch.nn.Module:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSM_LITE_ASSETS", str(real_assets))
        return load_model(device="cpu")


def fake_assets(tmp_path: Path, content: bytes, listed_sha: str | None, name: str = DEFAULT_MODEL) -> Path:
    (tmp_path / "weights").mkdir()
    (tmp_path / f"weights/{name}.safetensors").write_bytes(content)
    if listed_sha is not None:
        (tmp_path / "SHA256SUMS").write_text(f"{listed_sha}  ./weights/{name}.safetensors\n")
    return tmp_path


def test_loads_real_weights(model: torch.nn.Module) -> None:
    assert isinstance(model, timm.models.VisionTransformer) and not model.training
    assert sum(p.numel() for p in model.parameters()) == 5_717_416
    assert weights_fingerprint(model) == FINGERPRINT


def test_fingerprint_deterministic_and_sensitive(model: torch.nn.Module) -> None:
    clone = timm.create_model("vit_tiny_patch16_224")
    clone.load_state_dict(model.state_dict())
    assert weights_fingerprint(clone.double()) == FINGERPRINT  # dtype does not matter
    with torch.no_grad():
        clone.head.bias[0] += 1e-3
    assert weights_fingerprint(clone) != FINGERPRINT


def test_real_top1_is_high(model: torch.nn.Module, with_assets: Path) -> None:
    from dsm_lite.data import load_images

    s = load_images("imagenet-sample", model, n=50, seed=0)
    acc = topk_accuracy(predict(model, s.images), s.labels)
    assert acc[1] >= 0.7 and acc[5] >= 0.9, acc


def test_device_and_pick_device(with_assets: Path) -> None:
    assert pick_device().type in ("cpu", "cuda")
    m = load_model(device=torch.device("cpu"))
    assert next(m.parameters()).device.type == "cpu"


def test_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSM_LITE_ASSETS", str(tmp_path))
    with pytest.raises(AssetNotFoundError, match="unset DSM_LITE_ASSETS"):
        load_model()


def test_assets_dir_not_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSM_LITE_ASSETS", str(tmp_path / "nope"))
    with pytest.raises(AssetNotFoundError, match="DSM_LITE_ASSETS"):
        load_model()


def test_checksum_mismatch_in_sha256sums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSM_LITE_ASSETS", str(fake_assets(tmp_path, b"not weights", "0" * 64)))
    with pytest.raises(ChecksumError, match="SHA256SUMS"):
        load_model()


def test_swapped_sha256sums_does_not_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SHA256SUMS agrees with the bad file, but dsm_lite's own manifest does not.
    content = b"not weights"
    monkeypatch.setenv("DSM_LITE_ASSETS", str(fake_assets(tmp_path, content, hashlib.sha256(content).hexdigest())))
    with pytest.raises(ChecksumError, match="manifest"):
        load_model()


def test_unlisted_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    monkeypatch.setenv("DSM_LITE_ASSETS", str(fake_assets(tmp_path, b"x", None, name=name)))
    with pytest.raises(ChecksumError, match="No sha256"):
        load_model(name)


def test_checksum_ok_through_copy(real_assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / WEIGHTS).symlink_to(real_assets / WEIGHTS)
    sha = [l for l in (real_assets / "SHA256SUMS").read_text().splitlines() if WEIGHTS in l]
    (tmp_path / "SHA256SUMS").write_text(sha[0] + "\n")
    monkeypatch.setenv("DSM_LITE_ASSETS", str(tmp_path))
    assert weights_fingerprint(load_model(device="cpu")) == FINGERPRINT


@pytest.mark.parametrize("name", ["vit_nonexistent_patch16_224", "vit_tiny_patch16_224.no_such_tag"])
def test_unknown_model(name: str, with_assets: Path) -> None:
    with pytest.raises(UnknownModelError, match="timm has no"):
        load_model(name)


def test_not_a_vit(with_assets: Path) -> None:
    with pytest.raises(NotAViTError, match="ResNet"):
        load_model("resnet18")


def test_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("DSM_LITE_ASSETS", raising=False)
    # The env var is read at import time, so flip the constant the hub client reads per call.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OfflineError, match="DSM_LITE_ASSETS"):
        load_model()


def test_random_weights_download_nothing_and_follow_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSM_LITE_ASSETS", "/nonexistent")  # would fail if any file were looked up
    torch.manual_seed(0)
    a = load_model("deit_small_patch16_224", "cpu", pretrained=False)
    torch.manual_seed(0)
    b = load_model("deit_small_patch16_224", "cpu", pretrained=False)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    assert a.embed_dim == 384 and not a.training


def test_a_model_the_assets_do_not_ship_comes_from_the_hub(with_assets: Path) -> None:
    """With $DSM_LITE_ASSETS set, another model is not an asset error: it is downloaded, and
    offline that fails with OfflineError saying where to put the file."""
    from dsm_lite.models import _verified_weights_file

    assert _verified_weights_file("deit_small_patch16_224.fb_in1k") is None
    assert _verified_weights_file(DEFAULT_MODEL) is not None


def test_book_dtype() -> None:
    assert book_dtype(DEFAULT_MODEL, "cpu") == book_dtype(DEFAULT_MODEL, "cuda") == torch.float64
    assert book_dtype("deit_small_patch16_224", "cpu") == torch.float64  # CPU: the book's float64
    assert book_dtype("deit_small_patch16_224", "cuda") == torch.float32  # a GPU: the model's own
