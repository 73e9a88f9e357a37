"""TRL's SFTTrainer takes a MELoRAConfig as ``peft_config``: it trains, touches only the adapter, saves, reloads.

The first test runs the README's TRL block as written; the others set their own SFTConfig (``_sft_config``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from melora import MELoRAConfig
from tests.test_eval_fixtures import tiny_tokenizer
from tests.tiny_models import tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXTS = ["the cat sat on the mat.", "a dog ran in the park.", "one two three four five."]


def _sft_config(output_dir: Path, **overrides) -> trl.SFTConfig:
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": 30,
        "learning_rate": 2e-2,
        "per_device_train_batch_size": 3,
        "logging_steps": 1,
        "max_length": 32,
        "report_to": "none",
        "save_strategy": "no",
        "bf16": False,
        "disable_tqdm": True,
        "seed": 0,
    }
    kwargs.update(overrides)
    return trl.SFTConfig(**kwargs)


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own parameters under their original names (PEFT inserts ``.base_layer``)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in base.named_parameters()
        if "melora_" not in name
    }


def _fresh_base(tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_llama(tokenizer).eval()


def test_readme_trl_block_runs_on_a_cpu_as_written(tmp_path, monkeypatch):
    """The README's TRL block itself (TRL's defaults: bf16, 3 epochs), its placeholders a tiny Llama and 12 texts.

    It trains only the MELoRA factors, leaves the base weights bit-identical, and its saved adapter reloads.
    """
    from tests.test_readme import readme_block

    monkeypatch.chdir(tmp_path)  # the block writes runs/sft
    tokenizer = tiny_tokenizer()
    base_model = _fresh_base(tokenizer)
    before = _base_weights(base_model)
    placeholders = {  # the names the block takes from the reader's own code
        "base_model": base_model,
        "dataset": datasets.Dataset.from_dict({"text": TEXTS * 4}),
        "tokenizer": tokenizer,
    }
    namespace = dict(placeholders)
    exec(compile(readme_block("trl"), "README.md (TRL block)", "exec"), namespace)

    trainer = namespace["trainer"]
    assert isinstance(trainer.model, PeftModel)
    assert type(trainer.model.peft_config["default"]) is MELoRAConfig
    assert trainer.state.global_step == 6  # 3 epochs (TRL's default) x 12 texts / batch 8
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".melora_A." in n or ".melora_B." in n for n in trainable)
    after = _base_weights(trainer.model)
    assert after.keys() == before.keys()
    for name in before:
        torch.testing.assert_close(after[name].cpu(), before[name].cpu(), atol=0, rtol=0, msg=name)
    for name, param in trainer.model.named_parameters():
        if ".melora_B." in name:
            assert param.abs().sum() > 0, f"{name} stayed at its zero init"

    saved = json.loads((tmp_path / "runs/sft/adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "MELORA" and (saved["n"], saved["r"], saved["alpha"]) == (8, 1, 16)
    model = trainer.model.eval().float().cpu()
    reloaded = PeftModel.from_pretrained(_fresh_base(tokenizer), tmp_path / "runs/sft/adapter").eval()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_sft_trainer_chat_template_tokens_become_trainable_tokens_of_the_melora_config(tmp_path):
    """A cloned chat template adds tokens: TRL sets trainable_token_indices and modules_to_save on our config."""
    source = tiny_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    source.eos_token = "<|im_end|>"
    source.save_pretrained(tmp_path / "template")
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    config = MELoRAConfig(r=1, n=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(
        model=_fresh_base(tokenizer),
        peft_config=config,
        train_dataset=datasets.Dataset.from_dict({"messages": [conversation] * 6}),
        args=_sft_config(tmp_path / "run", max_steps=3, chat_template_path=str(tmp_path / "template")),
        processing_class=tokenizer,
    )
    config = trainer.model.peft_config["default"]
    resized = trainer.model.get_input_embeddings().weight.shape[0]
    assert resized % 64 == 0 and resized > vocab  # clone_chat_template rounds the vocabulary up to 64
    assert config.trainable_token_indices == {"embed_tokens": list(range(vocab, resized))}
    assert "lm_head" in config.modules_to_save
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    trainer.train()

    trainer.save_model(str(tmp_path / "adapter"))
    fresh = _fresh_base(tiny_tokenizer())  # TRL added the template's tokens to ``tokenizer`` in place
    fresh.resize_token_embeddings(resized)  # the added rows are all restored from the adapter
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    ids = trainer.processing_class.apply_chat_template(conversation, tokenize=True, return_dict=True)
    inputs = {"input_ids": torch.tensor([ids["input_ids"]])}
    assert max(inputs["input_ids"][0]) >= vocab  # the template's new tokens are in the input
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.cpu()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sft_trainer_smollm2_alpaca_melora_lowers_loss_saves_and_reloads(tmp_path):
    """SmolLM2-135M + MELoRA r=1 n=8 through SFTTrainer on 16 real Alpaca prompt/completion pairs."""
    pytest.importorskip("gguf")
    path = DATA_DIR / "instruct" / "alpaca" / "alpaca_data-00000-03252.json"
    if not path.is_file():
        pytest.skip(f"real Alpaca data not found at {path}")
    from melora.lab.data.instruct import build_prompt, load_file
    from melora.lab.models import load_causal_lm

    examples = load_file(path)[:16]
    dataset = datasets.Dataset.from_dict(
        {"prompt": [build_prompt(e) for e in examples], "completion": [e.output for e in examples]}
    )
    model, tokenizer = load_causal_lm("smollm2")
    config = MELoRAConfig(r=1, n=8, alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = _sft_config(
        tmp_path / "run", max_steps=8, learning_rate=3e-3, per_device_train_batch_size=4, max_length=128
    )
    trainer = trl.SFTTrainer(
        model=model,
        peft_config=config,
        train_dataset=dataset,
        eval_dataset=dataset,
        args=args,
        processing_class=tokenizer,
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after < loss_before, (loss_before, loss_after)

    trainer.save_model(str(tmp_path / "adapter"))
    fresh, _ = load_causal_lm("smollm2")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert type(reloaded.peft_config["default"]) is MELoRAConfig
    inputs = tokenizer([dataset[0]["prompt"]], return_tensors="pt")
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.cpu()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
