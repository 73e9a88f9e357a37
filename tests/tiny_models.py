"""Tiny models built in code (no download) for the test matrix."""

from __future__ import annotations

import torch


class TinyMLP(torch.nn.Module):
    """An MLP with two Linear layers to adapt and a head (modules_to_save)."""

    def __init__(self, d_in: int = 32, hidden: int = 48, d_out: int = 4) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(d_in, hidden)
        self.act = torch.nn.ReLU()
        self.lin1 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.lin1(self.act(self.lin0(x)))))


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=120,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=64)
    return GPT2LMHeadModel(cfg)


def tiny_llama(tokenizer=None, max_position_embeddings: int = 64):
    """A 2-layer Llama, hidden 64, GQA (v_proj 64 -> 32); vocab 120, or the given tokenizer's with its ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    token_ids = {}
    if tokenizer is not None:
        token_ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": None,
        }
    cfg = LlamaConfig(
        vocab_size=120 if tokenizer is None else len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        **token_ids,
    )
    return LlamaForCausalLM(cfg)


# name -> (factory, target_modules, example input builder, task_type, modules_to_save)
TINY_MODELS = {
    "mlp": (TinyMLP, ["lin0", "lin1"], lambda: {"x": torch.randn(3, 32)}, None, ["head"]),
    "bert": (
        tiny_bert,
        ["query", "value"],
        lambda: {"input_ids": torch.randint(1, 120, (2, 9))},
        "SEQ_CLS",
        None,
    ),
    "gpt2": (tiny_gpt2, ["c_attn"], lambda: {"input_ids": torch.randint(0, 120, (2, 9))}, "CAUSAL_LM", None),
    "llama": (
        tiny_llama,
        ["q_proj", "v_proj"],
        lambda: {"input_ids": torch.randint(0, 120, (2, 9))},
        "CAUSAL_LM",
        None,
    ),
}


def model_output(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


GLUE_WORDS = "the a cat dog sat ran on mat yes no is was big small red blue here there".split()


def write_tiny_glue(
    root, hidden: int = 64, layers: int = 2, counts=(("train", 48), ("dev", 20)), dropout: float = 0.1
) -> dict:
    """A tiny BERT classifier with its own WordPiece vocab, and RTE-layout TSVs (label: 'yes' in sentence2).

    ``dropout=0`` makes training deterministic across process counts (the distributed tests).

    Returns ``{"model": folder, "data_dir": folder}`` for the GLUE runner.
    """
    import random
    from pathlib import Path

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = Path(root)
    model_dir = root / "model"
    model_dir.mkdir(parents=True)
    vocab = model_dir / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *GLUE_WORDS]) + "\n")
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(GLUE_WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(model_dir)
    rng = random.Random(0)
    for split, count in counts:
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(count):
            s1 = " ".join(rng.choices(GLUE_WORDS, k=6))
            s2 = " ".join(rng.choices(GLUE_WORDS[:-2], k=3))
            lines.append(f"{i}\t{s1}\t{s2}\t{'entailment' if 'yes' in s2.split() else 'not_entailment'}")
        (root / "data" / "RTE").mkdir(parents=True, exist_ok=True)
        (root / "data" / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return {"model": str(model_dir), "data_dir": str(root / "data")}
