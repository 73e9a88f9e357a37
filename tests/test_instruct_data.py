"""Instruction data: loading and format errors, prompts, label masking, collation, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from melora.lab.data.instruct import (
    ALPACA_PROMPT_INPUT,
    IGNORE_INDEX,
    InstructCollator,
    InstructExample,
    build_prompt,
    load_examples,
    load_file,
    pack_features,
    split_examples,
    tokenize_example,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer (vocab 300) built in code; its pad token is its EOS, as in SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [ALPACA_PROMPT_INPUT, "Give three tips for staying healthy. Eat well, sleep, exercise."]
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(CHAT_TEMPLATE)


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


WITH_INPUT = InstructExample("Summarise the text.", "Cats sleep a lot.", "Cats nap.")
NO_INPUT = InstructExample("Name a colour.", "", "Blue.")


# --- prompts -------------------------------------------------------------------------------------


def test_alpaca_prompt_with_input():
    prompt = build_prompt(WITH_INPUT)
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith(
        "### Instruction:\nSummarise the text.\n\n### Input:\nCats sleep a lot.\n\n### Response:\n"
    )


def test_alpaca_prompt_without_input():
    prompt = build_prompt(NO_INPUT)
    assert prompt.startswith("Below is an instruction that describes a task. Write a response")
    assert "### Input:" not in prompt
    assert prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n")


def test_chat_prompt_uses_the_tokenizer_template(tokenizer):
    prompt = build_prompt(WITH_INPUT, "chat", tokenizer)
    assert (
        prompt == f"<|im_start|>user\nSummarise the text.\n\nCats sleep a lot.{EOS}\n<|im_start|>assistant\n"
    )


def test_chat_prompt_without_a_chat_template_is_an_error():
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        build_prompt(NO_INPUT, "chat", build_tiny_tokenizer())


def test_unknown_template_is_an_error():
    with pytest.raises(ValueError, match="Unknown template 'vicuna'"):
        build_prompt(NO_INPUT, "vicuna")


# --- tokenisation and label masking ------------------------------------------------------------------


def test_response_only_labels_end_with_eos(tokenizer):
    feature = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=512)
    prompt_len = len(tokenizer(build_prompt(WITH_INPUT))["input_ids"])
    response = tokenizer(WITH_INPUT.output, add_special_tokens=False)["input_ids"]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id
    assert feature["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert feature["labels"][prompt_len:] == response + [tokenizer.eos_token_id]
    assert feature["input_ids"][prompt_len:] == response + [tokenizer.eos_token_id]


def test_train_on_inputs_labels_every_token(tokenizer):
    feature = tokenize_example(NO_INPUT, tokenizer, cutoff_len=512, train_on_inputs=True)
    assert feature["labels"] == feature["input_ids"]
    assert feature["labels"][-1] == tokenizer.eos_token_id


def test_chat_template_tokenisation_masks_the_chat_prompt(tokenizer):
    feature = tokenize_example(NO_INPUT, tokenizer, cutoff_len=512, template="chat")
    kept = [t for t in feature["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "Blue." + EOS


def test_cutoff_truncates(tokenizer):
    feature = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=10, train_on_inputs=True)
    assert len(feature["input_ids"]) == len(feature["labels"]) == 10


def test_collator_masks_padding_by_position_not_by_id(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = tokenize_example(NO_INPUT, tokenizer, cutoff_len=512)
    long = tokenize_example(WITH_INPUT, tokenizer, cutoff_len=512)
    batch = InstructCollator(pad_token_id=tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(long["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    # the real EOS ending the short answer keeps its label; the pad positions after it do not
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_token_id).all()
    assert batch["labels"][1, -1].item() == tokenizer.eos_token_id


def test_collator_pads_to_multiple():
    batch = InstructCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    )
    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"].dtype == torch.long


def test_pack_features_keeps_examples_whole():
    features = [
        {"input_ids": [1] * 4, "labels": [1] * 4},
        {"input_ids": [2] * 3, "labels": [-100] * 3},
        {"input_ids": [3] * 5, "labels": [3] * 5},
    ]
    packed = pack_features(features, block_size=8)
    assert [p["input_ids"] for p in packed] == [[1] * 4 + [2] * 3, [3] * 5]
    assert packed[0]["labels"] == [1] * 4 + [-100] * 3


# --- loading and format errors -------------------------------------------------------------------------


def test_alpaca_and_dolly_files_load(tmp_path):
    alpaca = write_json(tmp_path / "a.json", [{"instruction": "i", "input": "x", "output": "o"}])
    dolly = tmp_path / "b.jsonl"
    dolly.write_text(
        json.dumps({"instruction": "q", "context": "c", "response": "r", "category": "qa"}) + "\n\n"
    )
    nulls = write_json(
        tmp_path / "c.json", [{"instruction": "i", "context": None, "response": "r", "category": None}]
    )
    examples = load_examples([alpaca, dolly, nulls])
    assert examples == [
        InstructExample("i", "x", "o"),
        InstructExample("q", "c", "r"),
        InstructExample("i", "", "r"),
    ]


def test_folder_loads_in_file_name_order(tmp_path):
    write_json(tmp_path / "part-2.json", [{"instruction": "second", "output": "o"}])
    write_json(tmp_path / "part-1.json", [{"instruction": "first", "input": None, "output": "o"}])
    (tmp_path / "README.md").write_text("not data")
    assert [ex.instruction for ex in load_examples([tmp_path])] == ["first", "second"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"bad\.json: file is empty"),
        ("[]", r"bad\.json: no records found"),
        ('{"instruction": ', r"bad\.json: not valid JSON"),
        ('{"instruction": "i"}', r"bad\.json: expected a JSON array of records, got dict"),
        (
            '[{"instruction": "i", "output": "o"}, {"instruction": "i", "answer": "a"}]',
            r"bad\.json record 1 \(line 1\): unknown field\(s\) answer; expected alpaca",
        ),
        (
            '[{"instruction": "i", "input": "x"}]',
            r"bad\.json record 0 \(line 1\): fields \['input', 'instruction'\] match no format",
        ),
        (
            '[{"instruction": "i", "output": 3}]',
            r"bad\.json record 0 \(line 1\): field 'output' is int \(3\)",
        ),
        ('[{"instruction": " ", "output": "o"}]', r"bad\.json record 0 \(line 1\): empty 'instruction'"),
        ('["just a string"]', r"bad\.json record 0 \(line 1\): expected a JSON object, got str"),
    ],
)
def test_malformed_json_files_name_the_file_and_record(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_file(path)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "i", "output": "o"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_file(path)


def test_missing_file_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json: no such file"):
        load_examples([tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="folder holds no .json / .jsonl files"):
        load_examples([tmp_path])


def test_split_is_deterministic_and_disjoint():
    examples = [InstructExample(f"q{i}", "", "a") for i in range(20)]
    train, val = split_examples(examples, val_size=5, max_samples=8, seed=0)
    again_train, again_val = split_examples(examples, val_size=5, max_samples=8, seed=0)
    assert (train, val) == (again_train, again_val)
    assert len(train) == 8 and len(val) == 5
    assert not set(train) & set(val)
    with pytest.raises(ValueError, match="val_size=20 must be in"):
        split_examples(examples, val_size=20, max_samples=None)


def test_real_alpaca_folder_loads():
    folder = DATA_DIR / "instruct" / "alpaca"
    if not folder.is_dir():
        pytest.skip(f"real Alpaca data not found at {folder}")
    examples = load_examples([folder])
    assert len(examples) == 52002
    assert examples[0].instruction == "Give three tips for staying healthy."


def test_real_dolly_shard_loads():
    path = DATA_DIR / "instruct" / "dolly-15k" / "global_test.json"
    if not path.is_file():
        pytest.skip(f"real Dolly data not found at {path}")
    assert len(load_file(path)) == 80


# --- the type of every field, bad bytes, bad JSON: file, record (line) and field ------------------------


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"instruction": "i", "output": 0}, r"field 'output' is int \(0\); expected a string \(the response text\)"),
        ({"instruction": "i", "output": []}, r"field 'output' is list \(\[\]\); expected a string"),
        ({"instruction": "i", "output": False}, r"field 'output' is bool \(false\); expected a string"),
        ({"instruction": "i", "output": None}, r"field 'output' is null; expected a string"),
        ({"instruction": 5, "output": "o"}, r"field 'instruction' is int \(5\); expected a string"),
        ({"instruction": "i", "input": 0, "output": "o"}, r"field 'input' is int \(0\); expected a string \(the input text, or leave it out\)"),
        ({"instruction": "i", "input": {}, "output": "o"}, r"field 'input' is dict \(\{\}\)"),
        ({"instruction": "i", "response": False}, r"field 'response' is bool \(false\); expected a string"),
        ({"instruction": "i", "context": [], "response": "r"}, r"field 'context' is list \(\[\]\)"),
        ({"instruction": "i", "response": "r", "category": 3}, r"field 'category' is int \(3\)"),
    ],
)  # fmt: skip
def test_every_field_must_be_a_string_never_read_as_empty(tmp_path, record, match):
    from melora.lab.args import UserError

    path = tmp_path / "data.json"
    path.write_text(
        "[\n" + json.dumps({"instruction": "ok", "output": "fine"}) + ",\n" + json.dumps(record) + "\n]"
    )
    with pytest.raises(UserError, match=r"data\.json record 1 \(line 3\): " + match):
        load_file(path)
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps({"instruction": "ok", "output": "fine"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=r"data\.jsonl, line 3: " + match):
        load_file(lines)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, suffix):
    from melora.lab.args import UserError

    path = tmp_path / f"latin{suffix}"
    good = json.dumps({"instruction": "i", "output": "o"}).encode()
    body = good + b"\n" + b'{"instruction": "caf\xe9", "output": "o"}\n'
    path.write_bytes(b"[" + good + b",\n" + body.split(b"\n")[1] + b"]" if suffix == ".json" else body)
    with pytest.raises(
        UserError, match=rf"latin\{suffix}, line 2: byte b'\\xe9' is not UTF-8 .*save the file as UTF-8"
    ):
        load_examples([path])


def test_invalid_json_names_file_line_and_column(tmp_path):
    from melora.lab.args import UserError

    path = tmp_path / "bad.json"
    path.write_text('[\n{"instruction": "i", "output": "o"},\n{"instruction": "i" "output": "o"}\n]')
    with pytest.raises(
        UserError, match=r"bad\.json: not valid JSON \(Expecting ',' delimiter at line 3, column 21\)"
    ):
        load_file(path)
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"instruction": "i", "output": "o"}\n{"instruction": "i",}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2 is not valid JSON \(.* at column 21\)"):
        load_file(lines)


def test_jsonl_lines_count_newlines_only(tmp_path):
    """A JSON string may hold U+2028 raw; str.splitlines() split the record there and miscounted lines."""
    path = tmp_path / "u.jsonl"
    record = {"instruction": "a\u2028b", "output": "o"}
    path.write_text(
        json.dumps(record, ensure_ascii=False) + "\n" + json.dumps({"instruction": "i", "output": 0}) + "\n"
    )
    with pytest.raises(ValueError, match=r"u\.jsonl, line 2: field 'output' is int"):
        load_file(path)
