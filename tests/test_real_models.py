"""Real pretrained models (offline, from PyPI packages) take MELoRA adapters and learn on real data."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from melora import MELoRAConfig, adapter_summary, export_lora
from melora.lab.models import load_causal_lm, load_sequence_classifier
from melora.tuner.layer import MELoRALayer

pytestmark = pytest.mark.slow


def _rte_rows(glue_dir: Path, limit: int) -> list[dict]:
    with open(glue_dir / "RTE" / "train.tsv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[:limit]


def _mean_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_minilm_rte_trainer_lowers_loss_checkpoints_and_reloads(shared_data, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_sequence_classifier("minilm", num_labels=2)
    base = copy.deepcopy(model)
    rows = _rte_rows(shared_data / "glue", 32)
    enc = tokenizer(
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        truncation=True,
        max_length=96,
        padding="max_length",
        return_tensors="pt",
    )
    labels = torch.tensor([int(r["label"] == "not_entailment") for r in rows])
    items = [
        {
            "input_ids": enc["input_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "token_type_ids": enc["token_type_ids"][i],
            "labels": labels[i],
        }
        for i in range(len(rows))
    ]
    config = MELoRAConfig(
        r=1, n=8, alpha=16, dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    peft_model = get_peft_model(model, config)
    summary = adapter_summary(peft_model)
    assert summary["adapter_params"] == 6 * 2 * (384 + 384)  # r*(d_in+d_out) per module, 12 modules
    assert summary["equivalent_rank"] == 8
    batches = [
        {k: torch.stack([it[k] for it in items[i : i + 16]]) for k in items[0]} for i in range(0, 32, 16)
    ]
    before = _mean_loss(peft_model, batches)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        num_train_epochs=6,
        learning_rate=3e-3,
        save_strategy="epoch",
        save_total_limit=1,
        report_to="none",
        logging_steps=1,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=peft_model, args=args, train_dataset=_ListDataset(items)).train()
    after = _mean_loss(peft_model, batches)
    assert after < before - 0.02, (before, after)
    checkpoint = sorted((tmp_path / "out").glob("checkpoint-*"))[-1]
    reloaded = PeftModel.from_pretrained(base, checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batches[0]).logits, peft_model(**batches[0]).logits, atol=1e-5, rtol=1e-5
        )


def _alpaca_texts(shared_data: Path, limit: int) -> list[str]:
    first = sorted((shared_data / "instruct" / "alpaca").glob("*.json"))[0]
    records = json.loads(first.read_text(encoding="utf-8"))[:limit]
    return [
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}"
        for r in records
    ]


def test_smollm2_alpaca_trainer_lowers_loss_and_exports_to_lora(shared_data, tmp_path):
    torch.manual_seed(0)
    model, tokenizer = load_causal_lm("smollm2")
    assert not getattr(model, "is_quantized", False)
    base = copy.deepcopy(model)
    texts = _alpaca_texts(shared_data, 8)
    enc = tokenizer(texts, truncation=True, max_length=96, padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)  # mask padding by attention
    items = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
        for i in range(len(texts))
    ]
    config = MELoRAConfig(r=1, n=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    v_proj = peft_model.base_model.model.model.layers[0].self_attn.v_proj
    assert isinstance(v_proj, MELoRALayer) and v_proj.melora_B["default"].shape == (
        8,
        24,
        1,
    )  # 576 -> 192 GQA
    batches = [{k: torch.stack([it[k] for it in items[i : i + 4]]) for k in items[0]} for i in range(0, 8, 4)]
    before = _mean_loss(peft_model, batches)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_train_epochs=3,
        learning_rate=2e-3,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=peft_model, args=args, train_dataset=_ListDataset(items)).train()
    after = _mean_loss(peft_model, batches)
    assert after < before - 0.05, (before, after)
    # The exported rank-8 LoRA, loaded by plain PEFT, reproduces the trained MELoRA model.
    export_lora(peft_model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    assert isinstance(lora.peft_config["default"], LoraConfig) and lora.peft_config["default"].r == 8
    with torch.no_grad():
        diff = (lora(**batches[0]).logits - peft_model(**batches[0]).logits).abs().max().item()
    assert diff <= 1e-4, diff
