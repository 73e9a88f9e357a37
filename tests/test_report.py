"""melora report: grouping over seeds, mean/std by hand, markdown, plot, JSON and errors."""

import argparse
import json

import pytest

from melora.atomic import write_json_atomic
from melora.lab.report import add_parser, aggregate, find_results, load_run, report


def write_run(folder, kind, label, seed, summary, params):
    run = {
        "kind": kind,
        "label": label,
        "method": label.split()[0],
        "seed": seed,
        "summary": summary,
        "trainable_params": params,
        "equivalent_rank": 8,
        "config": {},
        "versions": {},
        "wall_time_s": 1.0,
    }
    write_json_atomic(folder / "results.json", run)


@pytest.fixture
def runs(tmp_path):
    for seed, (lora, melora) in enumerate([(0.60, 0.70), (0.64, 0.66)]):
        write_run(
            tmp_path / "rte" / "lora" / f"s{seed}",
            "glue",
            "lora r=8",
            seed,
            {"rte/accuracy_best": lora, "rte/accuracy_last": lora - 0.1},
            74498,
        )
        write_run(
            tmp_path / "rte" / "melora" / f"s{seed}",
            "glue",
            "melora r=1 n=8",
            seed,
            {"rte/accuracy_best": melora, "rte/accuracy_last": melora - 0.1},
            9986,
        )
    write_run(tmp_path / "eval" / "a", "eval", "lora r=8", 0, {"mmlu/acc": 0.25, "bbh/em": 0.1}, 100)
    return tmp_path


def test_mean_and_sample_std_over_seeds(runs):
    groups = aggregate([load_run(p) for p in find_results([runs / "rte"])], keys="_best$")
    by_label = {g.label: g for g in groups}
    assert set(by_label) == {"lora r=8", "melora r=1 n=8"}
    assert by_label["lora r=8"].mean == pytest.approx(0.62)
    assert by_label["lora r=8"].std == pytest.approx(0.02 * 2**0.5)  # sqrt((0.02^2 + 0.02^2) / 1)
    assert by_label["melora r=1 n=8"].mean == pytest.approx(0.68)
    assert sorted(by_label["melora r=1 n=8"].seeds) == [0, 1]


def test_table_plot_and_json(runs, tmp_path):
    table = report([runs], output=tmp_path / "t.md", plot=tmp_path / "p.png", json_path=tmp_path / "g.json")
    assert "**glue**" in table and "**eval**" in table
    assert "| melora r=1 n=8 | 9,986 | 0.680 ± 0.028 (2) | 0.580 ± 0.028 (2) |" in table
    assert "avg" not in table  # no mean across unrelated metrics
    assert table.index("melora r=1 n=8") < table.index("| lora r=8 | 74,498")  # rows sorted by params
    assert "| lora r=8 | 100 | 0.100 (1) | 0.250 (1) |" in table  # one run: no spread shown
    assert (tmp_path / "t.md").read_text() == table
    assert (tmp_path / "p.png").stat().st_size > 1000
    groups = json.loads((tmp_path / "g.json").read_text())["groups"]
    assert len(groups) == 6 and all({"mean", "std", "n", "values"} <= set(g) for g in groups)


def test_cli_prints_the_table(runs, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(runs / "rte"), "--keys", "accuracy_best"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "rte/accuracy_best" in out and "accuracy_last" not in out


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="No results.json found under"):
        find_results([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist; pass run folders"):
        find_results([tmp_path / "nope"])
    (tmp_path / "results.json").write_text(json.dumps({"kind": "glue", "label": "x"}))
    with pytest.raises(ValueError, match=r"results.json: not a melora results file; missing \['summary'\]"):
        load_run(tmp_path / "results.json")
    write_run(tmp_path, "glue", "lora r=8", 0, {"rte/accuracy_best": 0.5}, 10)
    with pytest.raises(ValueError, match="No summary key matches 'mcc'"):
        report([tmp_path], keys="mcc")


def test_runs_sharing_a_label_but_not_a_config_are_refused(tmp_path):
    for seed, lr in ((0, 1e-3), (1, 3e-3)):
        write_run(tmp_path / f"s{seed}", "eval", "adapter", seed, {"mmlu/acc": 0.3}, 10)
        data = json.loads((tmp_path / f"s{seed}" / "results.json").read_text())
        data["config"] = {"lr": lr, "seed": seed, "output_dir": f"s{seed}"}
        write_json_atomic(tmp_path / f"s{seed}" / "results.json", data)
    with pytest.raises(ValueError, match=r"share the label 'adapter' but differ in lr: 0.001 vs 0.003"):
        report([tmp_path])
    data["config"]["lr"] = 1e-3  # seeds and output folders may differ
    write_json_atomic(tmp_path / "s1" / "results.json", data)
    assert "| adapter | 10 | 0.300 ± 0.000 (2) |" in report([tmp_path])


def test_output_dir_writes_table_plot_and_groups(runs, tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["report", str(runs / "rte"), "--output-dir", str(out)])
    assert args.func(args) == 0
    assert "rte/accuracy_best" in (out / "table.md").read_text()
    assert (out / "score_vs_params.png").stat().st_size > 1000 and json.loads(
        (out / "groups.json").read_text()
    )


def _drawn_x_labels(monkeypatch, groups, tmp_path) -> list[str]:
    """The x tick labels of the first panel ``plot_score_vs_params`` draws (inside the axis' view)."""
    import matplotlib.pyplot as plt

    from melora.lab.report import plot_score_vs_params

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    plot_score_vs_params(groups, tmp_path / "p.png")
    (fig,) = figures
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high and t.get_text()]


@pytest.mark.parametrize(
    "params, expected",
    [
        ([20_000, 35_000, 60_000], ["20,000", "35,000", "60,000"]),  # no power of ten in view
        ([9_000, 10_000, 40_000], ["9,000", "40,000"]),  # one: 10,000 too close to 9,000 to label
        ([500, 74_498], ["$\\mathdefault{10^{3}}$", "$\\mathdefault{10^{4}}$"]),  # decades: powers of ten
    ],
    ids=["within-a-decade", "across-one-power", "several-decades"],
)
def test_the_params_axis_is_labelled_however_narrow_the_data(monkeypatch, tmp_path, params, expected):
    from melora.lab.report import Group

    groups = [Group("glue", f"m{p}", "rte/accuracy_best", [0.6], [0], [p]) for p in params]
    assert _drawn_x_labels(monkeypatch, groups, tmp_path) == expected
