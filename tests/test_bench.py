"""melora bench: configurations, the loop baseline's correctness, the harness end to end (no timing asserts)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import melora  # noqa: F401  (registers MELORA)
from melora.functional import block_diagonal
from melora.lab.bench import (
    Experiment,
    LayerShape,
    MethodSpec,
    ModelCase,
    render_markdown,
    render_plot,
    run_experiment,
)
from melora.lab.bench.analysis import evaluate_targets
from melora.lab.bench.config import experiment_from_dict, gralora_for
from melora.lab.bench.configurations import SingleLinear, attach_adapter
from melora.lab.bench.harness import KINDS
from melora.lab.bench.kernels import VARIANTS
from melora.lab.bench.loop_baseline import LoopMELoRALinear
from melora.lab.yaml_files import read_yaml

REPO = Path(__file__).resolve().parents[1]


def _check_results(results: dict, experiment: Experiment) -> None:
    expected = {spec.label for spec in experiment.methods()}
    assert results["kind"] == "bench" and results["hardware"]["torch_threads"] >= 1
    for case in results["cases"]:
        assert {row["label"] for row in case["rows"]} == expected
        for row in case["rows"]:
            for kind in KINDS:
                times = row["times_s"][kind]
                assert len(times) == experiment.repeats
                assert all(math.isfinite(t) and t > 0 for t in times), (row["label"], kind, times)
    assert all(math.isfinite(value) for value in results["summary"].values())


def test_loop_baseline_equals_melora_for_the_same_weights() -> None:
    torch.manual_seed(0)
    base = SingleLinear(16)
    reference = base.proj.weight.detach().clone()
    model = attach_adapter(base, MethodSpec("melora", r=2, n=4), ["proj"], alpha=8)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.melora_B["default"].normal_()  # B starts at zero: make the adapter visible
    loop = LoopMELoRALinear(torch.nn.Linear(16, 16, bias=False), r=2, n=4, alpha=8)
    with torch.no_grad():
        loop.base.weight.copy_(reference)
    loop.load_melora_factors(layer.melora_A["default"], layer.melora_B["default"])
    x = torch.randn(3, 5, 16)
    expected = model(x)
    torch.testing.assert_close(loop(x), expected)
    loop.merge()
    torch.testing.assert_close(loop(x), expected, atol=1e-5, rtol=1e-5)
    loop.unmerge()
    torch.testing.assert_close(loop.base.weight, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("r,n", [(1, 1), (1, 8), (3, 4)])
def test_kernel_variants_are_exact(r: int, n: int) -> None:
    torch.manual_seed(0)
    x, A, B = torch.randn(2, 7, 32), torch.randn(n, r, 32 // n), torch.randn(n, 32 // n, r)
    dense = x @ (block_diagonal(B) @ block_diagonal(A)).T * 0.5
    for name, variant in VARIANTS.items():
        torch.testing.assert_close(variant(x, A, B, 0.5), dense, atol=1e-4, rtol=1e-4, msg=name)


def test_configurations_and_gralora_choice() -> None:
    experiment = Experiment(name="t", level="layer", shapes=[LayerShape(64, 8)], melora=[(1, 8), (8, 8)])
    labels = [spec.label for spec in experiment.methods()]
    assert labels == [
        "base",
        "melora r=1 n=8",
        "lora r=1",
        "lora r=8",
        "gralora r=8 k=8",
        "loop r=1 n=8",
        "melora r=8 n=8",
        "lora r=64",
        "loop r=8 n=8",
    ]
    assert gralora_for(2, 4) == MethodSpec("gralora", r=4, k=4)
    assert MethodSpec("melora", r=2, n=4).equivalent_rank == 8


def test_invalid_experiments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="level='gpu': choose 'layer', 'e2e' or 'kernel'"):
        Experiment(name="t", level="gpu", melora=[(1, 8)])
    with pytest.raises(ValueError, match=r"baselines \['dora'\]"):
        Experiment(name="t", level="layer", shapes=[LayerShape(8, 8)], melora=[(1, 8)], baselines=("dora",))
    with pytest.raises(ValueError, match="must be a multiple of k"):
        MethodSpec("gralora", r=2, k=4)
    with pytest.raises(ValueError, match=r"Unknown benchmark option\(s\) \['repeat'\]"):
        experiment_from_dict({"name": "t", "level": "layer", "repeat": 3, "melora": [{"r": 1, "n": 2}]})
    with pytest.raises(ValueError, match="set task to 'seq_cls' or 'causal_lm'"):
        ModelCase("my/model", batch=1, seq_len=8, target_modules=("q",))


def test_layer_level_end_to_end_renders(tmp_path: Path) -> None:
    experiment = experiment_from_dict(
        {
            "name": "tiny",
            "level": "layer",
            "shapes": {"d": 32, "tokens": 16},
            "melora": [{"r": 1, "n": [1, 2, 4]}],
            "repeats": 2,
            "warmup": 1,
            "min_time_s": 0.0,
            "threads": 1,
            "memory": False,
        }
    )
    results = run_experiment(experiment)
    _check_results(results, experiment)
    checks = {t["check"] for t in results["targets"]}
    assert {"train_vs_lora_same_params", "overhead_vs_base", "merged_forward_vs_base"} <= checks
    markdown = render_markdown(json.loads(json.dumps(results)))
    assert "| melora r=1 n=4 |" in markdown and "| loop r=1 n=4 |" in markdown and "Targets:" in markdown
    assert render_plot(results, tmp_path / "bench_tiny.png").stat().st_size > 0


def test_e2e_level_on_a_tiny_llama(tmp_path: Path) -> None:
    experiment = Experiment(
        name="tiny-e2e",
        level="e2e",
        models=[ModelCase("tiny-llama", batch=2, seq_len=8, target_modules=("q_proj", "v_proj"))],
        melora=[(1, 4)],
        repeats=2,
        min_time_s=0.0,
        threads=1,
        memory=False,
    )
    results = run_experiment(experiment)
    _check_results(results, experiment)
    rows = {row["label"]: row for row in results["cases"][0]["rows"]}
    assert rows["melora r=1 n=4"]["trainable_params"] == rows["lora r=1"]["trainable_params"]
    assert rows["base"]["trainable_params"] == 0
    assert render_plot(results, tmp_path / "bench_e2e.png").exists()


def test_the_command_entry_is_main_like_every_other_command() -> None:
    from melora.lab.bench import runner

    parser = argparse.ArgumentParser(prog="melora")
    runner.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["bench", "x.yaml"]).func is runner.main
    assert not hasattr(runner, "run")


@pytest.mark.slow
def test_quick_command_writes_json_table_and_plot(tmp_path: Path) -> None:
    from melora.lab.bench import runner

    parser = argparse.ArgumentParser(prog="melora")
    runner.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "--quick", str(REPO / "benchmarks" / "quick.yaml"), "--out-dir", str(tmp_path / "out")]
        + ["--figures-dir", str(tmp_path / "fig")]
    )
    assert args.func(args) == 0
    results = json.loads((tmp_path / "out" / "quick-quick.json").read_text())
    _check_results(results, experiment_from_dict(read_yaml(REPO / "benchmarks" / "quick.yaml")).quick())
    assert all(row["memory"]["peak_mb"] > 0 for row in results["cases"][0]["rows"])
    assert "| loop r=1 n=8 |" in (tmp_path / "out" / "quick-quick.md").read_text()
    assert (tmp_path / "fig" / "bench_quick-quick.png").stat().st_size > 0


def _row(spec: MethodSpec, train: list[float]) -> dict:
    times = {"train": train, "forward": [1.0] * len(train), "forward_merged": [1.0] * len(train)}
    return {"label": spec.label, "method": dataclasses.asdict(spec), "times_s": times}


def test_compile_measures_every_configuration_twice_and_checks_compiled_against_eager() -> None:
    experiment = Experiment(
        name="t", level="layer", shapes=[LayerShape(64, 8)], melora=[(1, 2), (1, 4), (1, 8)],
        baselines=("lora_same_params", "base"), compile=True,
    )  # fmt: skip
    labels = [spec.label for spec in experiment.methods()]
    eager = ["base", "melora r=1 n=2", "lora r=1", "melora r=1 n=4", "melora r=1 n=8"]
    assert labels == eager + [f"{label} +compile" for label in eager]
    # synthetic times (3 repeats): compiled MELoRA n=8 is 1.2x compiled LoRA(1), eager MELoRA n=8 is 1.1x
    t = {"base": [1.0, 2.0, 1.0], "lora": [2.0, 4.0, 2.0]}
    rows = [_row(MethodSpec("base"), t["base"]), _row(MethodSpec("lora", r=1), t["lora"])]
    rows += [_row(MethodSpec("melora", r=1, n=n), [2.0 * (1 + n / 80)] * 3) for n in (2, 4, 8)]
    rows += [_row(MethodSpec("base", compiled=True), t["base"])]
    rows += [_row(MethodSpec("lora", r=1, compiled=True), t["lora"])]
    rows += [_row(MethodSpec("melora", r=1, n=n, compiled=True), [2.4, 4.8, 2.4]) for n in (2, 4, 8)]
    checks = {(c["melora"], c["check"]): c for c in evaluate_targets([{"case": "c", "rows": rows}])}
    # eager MELoRA n=8: 2.2 every repeat, LoRA(1): 2, 4, 2 -> per-repeat ratios 1.1, 0.55, 1.1, median 1.1
    assert checks[("melora r=1 n=8", "train_vs_lora_same_params")]["value"] == pytest.approx(1.1)
    compiled = checks[("melora r=1 n=8 +compile", "compiled_train_vs_lora_same_params_vs_eager")]
    assert compiled["value"] == pytest.approx(1.2) and compiled["eager"] == pytest.approx(1.1)
    assert compiled["met"] is False  # compiling made MELoRA relatively slower here
    # flat in n, paired: n=8 / n=2 = (1 + 8/80) / (1 + 2/80)
    flat = checks[("melora r=1 n=8 / n=2", "largest_n_over_smallest")]
    assert flat["value"] == pytest.approx(1.1 / 1.025) and flat["met"] is True
    assert checks[("melora r=1 n=8 / n=2 +compile", "largest_n_over_smallest")]["value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="compile: true is for the layer and e2e levels"):
        Experiment(
            name="t",
            level="kernel",
            shapes=[LayerShape(8, 8)],
            melora=[(1, 2)],
            variants=("bmm",),
            compile=True,
        )


def test_non_square_layer_shapes_and_the_quick_caps() -> None:
    experiment = experiment_from_dict(
        {
            "name": "rect",
            "level": "layer",
            "shapes": [{"d": [4096], "d_out": [11008], "tokens": [4096]}],
            "melora": [{"r": 1, "n": 8}],
            "baselines": ["lora_same_params"],
        }
    )
    assert experiment.shapes == [LayerShape(4096, 4096, 11008)]
    assert experiment.shapes[0].label == "layer 4096x11008 T=4096"
    quick = experiment.quick().shapes[0]
    assert (quick.d, quick.out_features, quick.tokens) == (256, 512, 128)
    from melora.lab.bench.configurations import layer_workload

    quick_experiment = experiment.quick()
    workload = layer_workload(quick_experiment, quick, MethodSpec("melora", r=1, n=8), torch.device("cpu"))
    layer = workload.model.base_model.model.proj
    assert (layer.in_features, layer.out_features) == (256, 512)
    assert layer.melora_B["default"].shape == (8, 512 // 8, 1)
    workload.train_step()  # (T, 256) -> (T, 512) with a (T, 512) output gradient
    assert quick_experiment.name == "rect-quick"


def test_random_models_keep_their_widths_and_reject_unknown_names() -> None:
    from melora.lab.bench.configurations import SMOLLM2_135M, random_model

    case = ModelCase("smollm2-random", batch=8, seq_len=512, target_modules=("q_proj",))
    quick = Experiment(name="q", level="e2e", models=[case], melora=[(1, 8)]).quick().models[0]
    assert (quick.batch, quick.seq_len, quick.layers) == (2, 32, 2)
    model = random_model("smollm2-random", layers=quick.layers)
    assert model.config.hidden_size == SMOLLM2_135M["hidden_size"] and model.config.num_hidden_layers == 2
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (192, 576)  # GQA: 3 kv heads x 64
    with pytest.raises(ValueError, match="the random models are"):
        random_model("gpt-random")


def _bench_args(*argv: str) -> argparse.Namespace:
    from melora.lab.bench import runner

    parser = argparse.ArgumentParser(prog="melora")
    runner.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


def _repository_outputs() -> dict[str, float]:
    """Every file under the committed results and figures folders, with its modification time."""
    folders = (REPO / "benchmarks" / "results", REPO / "docs" / "figures")
    return {str(p): p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}


def test_quick_run_writes_into_its_own_folder_never_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment = tmp_path / "tiny.yaml"
    experiment.write_text(
        "name: tiny\nlevel: layer\nshapes: {d: [16], tokens: [8]}\nmelora: [{r: [1], n: [2]}]\n"
        "baselines: [lora_same_params, lora_same_rank, base]\nrepeats: 1\nwarmup: 0\nthreads: 1\n"
        "memory: false\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the defaults are relative to the current folder, as for a user
    before = _repository_outputs()
    args = _bench_args("--quick", str(experiment))
    assert args.func(args) == 0
    assert sorted(p.name for p in work.iterdir()) == ["bench-tiny-quick"]  # no benchmarks/, no docs/
    folder = work / "bench-tiny-quick"
    assert sorted(p.name for p in folder.iterdir()) == [
        "bench_tiny-quick.png",
        "tiny-quick.json",
        "tiny-quick.md",
    ]
    assert capsys.readouterr().out.rstrip().endswith("results in bench-tiny-quick/")
    markdown = (folder / "tiny-quick.md").read_text()
    assert "**Toy size, the targets are not meaningful here**" in markdown
    assert "layer d=16 T=8: d = 16 < 768, T = 8 < 512" in markdown
    assert "**no**" not in markdown  # a miss at toy size reads "no (toy size: not meaningful)"
    # an explicit --output-dir takes the JSON, the markdown and the plot
    args = _bench_args("--quick", str(experiment), "--output-dir", str(tmp_path / "out"))
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in folder.iterdir())
    assert sorted(p.name for p in work.iterdir()) == ["bench-tiny-quick"]
    assert _repository_outputs() == before


def test_benchmark_configs_still_write_the_committed_results_and_figures() -> None:
    from melora.lab.bench.runner import output_dirs

    results, figures = Path("benchmarks/results"), Path("docs/figures")
    for config in sorted((REPO / "benchmarks").glob("*.yaml")):
        command = config.read_text().splitlines()[0].removeprefix("# ").split()
        assert command[:2] == ["melora", "bench"], config
        args = _bench_args(*command[2:])
        label = experiment_from_dict(read_yaml(REPO / command[-1])).name
        expected = (Path(f"bench-{label}"),) * 2 if args.quick else (results, figures)
        assert output_dirs(args, label) == expected, config
    assert output_dirs(_bench_args("x.yaml", "--output-dir", "o"), "x") == (Path("o"), Path("o"))
    assert output_dirs(_bench_args("x.yaml", "--output-dir", "o", "--figures-dir", "f"), "x") == (
        Path("o"),
        Path("f"),
    )
    assert output_dirs(_bench_args("--render", "benchmarks/results/layer.json"), "layer") == (
        results,
        figures,
    )


def test_misses_at_toy_sizes_are_marked_not_meaningful() -> None:
    from melora.lab.bench.analysis import toy_cases, toy_size
    from melora.lab.bench.render import targets_table

    assert toy_size({"d": 768, "tokens": 512, "d_out": None}) is None
    assert toy_size({"d": 4096, "tokens": 4096, "d_out": 11008}) is None
    assert toy_size({"d": 4096, "tokens": 128, "d_out": 256}) == "d = 256 < 768, T = 128 < 512"
    assert toy_size({"model": "minilm", "batch": 16, "seq_len": 128, "layers": None}) is None
    assert toy_size({"model": "smollm2-random", "batch": 2, "seq_len": 32, "layers": 2}) == (
        "cut to 2 layers, 2 x 32 = 64 tokens < 1024"
    )
    assert "tiny test model" in toy_size({"model": "tiny-bert", "batch": 16, "seq_len": 128})
    cases = [
        {"case": "big", "params": {"d": 2048, "tokens": 2048}},
        {"case": "toy", "params": {"d": 256, "tokens": 128}},
    ]
    toy = toy_cases(cases)
    assert toy == {"toy": "d = 256 < 768, T = 128 < 512"}
    targets = [
        {"case": c, "melora": "m", "check": "x", "value": 1.2, "target": "<= 1.05", "met": met}
        for c in ("big", "toy")
        for met in (True, False)
    ]
    rows = [line.rsplit("|", 2)[1].strip() for line in targets_table(targets, toy)[2:]]
    assert rows == ["yes", "**no**", "yes", "no (toy size: not meaningful)"]
