"""The model card of a saved MELoRA adapter: the method, r, n, n*r, the base, both loading routes, scores."""

from __future__ import annotations

import json

import pytest
import yaml

import melora  # noqa: F401  (registers MELoRA with PEFT)
from melora.model_card import model_card, write_model_card
from melora.tuner.config import MELoRAConfig
from tests.tiny_models import tiny_bert


def header_and_body(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def test_the_card_of_a_tiny_saved_adapter_says_what_it_is_and_how_to_load_it(tmp_path):
    from peft import get_peft_model

    model = get_peft_model(tiny_bert(), MELoRAConfig(r=2, n=4, alpha=8, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path)  # PEFT's blank template first: the card replaces it
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    path = write_model_card(tmp_path, config, "some-org/base-model", trainable, {"rte/accuracy_best": 0.6875})
    assert path == tmp_path / "README.md"
    header, body = header_and_body(path.read_text())
    assert header == {
        "library_name": "peft",
        "base_model": "some-org/base-model",
        "tags": ["melora", "peft", "lora"],
    }
    for needed in (
        "https://arxiv.org/abs/2402.17263",
        "| r (rank of each mini LoRA) | 2 |",
        "| n (mini LoRAs per weight) | 4 |",
        "| equivalent rank n*r | 8 |",
        "| alpha (scaling = alpha / r) | 8 |",
        "`query`, `value`",
        f"| adapter parameters (trainable) | {trainable:,} |",
        "| base model | `some-org/base-model` |",
        "pip install melora",
        "import melora",
        "PeftModel.from_pretrained(base, ",
        "KeyError: 'MELORA'",
        "melora export-lora ADAPTER LORA_DIR",
        "| rte/accuracy_best | 0.6875 |",
    ):
        assert needed in body, needed
    assert "Fill in" not in body and "More Information Needed" not in body  # PEFT's template is gone


def test_a_config_object_works_and_no_scores_means_no_score_section():
    text = model_card(MELoRAConfig(r=1, n=8, target_modules=["q_proj", "v_proj"]), "HuggingFaceTB/SmolLM2")
    header, body = header_and_body(text)
    assert header["base_model"] == "HuggingFaceTB/SmolLM2"
    assert "| equivalent rank n*r | 8 |" in body and "Scores" not in body and "adapter parameters" not in body


def test_a_base_with_yaml_special_characters_still_parses():
    header, _ = header_and_body(model_card({"r": 1, "n": 2}, 'odd: "name" # x'))
    assert header["base_model"] == 'odd: "name" # x'


def test_anything_but_a_config_or_mapping_is_a_type_error():
    with pytest.raises(TypeError, match="expected a MELoRAConfig or a dict, got int"):
        model_card(3, "base")
