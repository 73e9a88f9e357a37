"""The GLUE TSV loader: layouts, label mapping, errors, and the real files when present."""

import re
from pathlib import Path

import pytest

from melora.lab.data.glue import TASKS, get_task, load_glue, read_tsv, subsample

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_headerless_cola_and_unbalanced_quotes(tmp_path):
    path = write(tmp_path / "CoLA" / "train.tsv", 'gj04\t1\t\tHe said "hi.\ngj04\t0\t*\tBad one.\n')
    columns = read_tsv(get_task("cola"), path)
    assert columns == {"sentence1": ['He said "hi.', "Bad one."], "label": [1, 0]}


def test_string_labels_map_in_hub_order(tmp_path):
    text = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\tc\td\tentailment\n"
    write(tmp_path / "RTE" / "train.tsv", text)
    write(tmp_path / "RTE" / "dev.tsv", text)
    data = load_glue("rte", tmp_path)
    assert set(data) == {"train", "validation"}
    assert data["train"]["label"] == [1, 0]
    assert data["train"]["sentence2"] == ["b", "d"]


def test_mrpc_bom_header_and_stsb_float_scores(tmp_path):
    mrpc = write(tmp_path / "m.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tx\ty\n")
    assert read_tsv(get_task("mrpc"), mrpc) == {"sentence1": ["x"], "sentence2": ["y"], "label": [1]}
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    stsb = write(tmp_path / "s.tsv", header + "0\tg\tf\t2012\t1\tn\tn\tA.\tB.\t3.800\n")
    assert read_tsv(get_task("stsb"), stsb)["label"] == [3.8]
    assert get_task("STS-B").num_labels == 1


def test_mnli_has_matched_and_mismatched_dev():
    assert get_task("mnli").splits == ("train", "validation_matched", "validation_mismatched")
    assert get_task("mnli").num_labels == 3


def test_errors_name_file_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing file .*RTE.*train\.tsv.*original GLUE TSV layout"):
        load_glue("rte", tmp_path)
    bad_header = write(tmp_path / "r.tsv", "index\tpremise\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ValueError, match=r"r\.tsv: expected a column 'sentence1' in the header"):
        read_tsv(get_task("rte"), bad_header)
    short = write(tmp_path / "c.tsv", "gj04\t1\n")
    with pytest.raises(ValueError, match=r"c\.tsv, line 1: expected at least 4 tab-separated fields, got 2"):
        read_tsv(get_task("cola"), short)
    bad_label = write(tmp_path / "l.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"line 2: label 'maybe' is not one of"):
        read_tsv(get_task("rte"), bad_label)
    with pytest.raises(ValueError, match="Unknown GLUE task 'boolq'"):
        get_task("boolq")


def test_subsample_is_seeded(tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"x": list(range(100))})
    first = subsample(data, 10, seed=3)["x"]
    assert first == subsample(data, 10, seed=3)["x"] and len(first) == 10
    assert first != subsample(data, 10, seed=4)["x"]
    assert len(subsample(data, None, seed=0)) == 100


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="real GLUE data (../shared/data/glue) not present")
@pytest.mark.parametrize(
    ("task", "train", "dev"),
    [
        ("cola", 8551, 1043),
        ("sst2", 67349, 872),
        ("mrpc", 3668, 408),
        ("stsb", 5749, 1500),
        ("rte", 2490, 277),
    ],
)
def test_real_glue_row_counts(task, train, dev):
    data = load_glue(task, DATA_DIR)
    assert (len(data["train"]), len(data["validation"])) == (train, dev)
    columns = (
        ["sentence1", "label"] if len(TASKS[task].text_columns) == 1 else ["sentence1", "sentence2", "label"]
    )
    assert data["train"].column_names == columns


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("rte", "", r"train\.tsv: the file is empty; expected the GLUE rte TSV"),
        ("cola", "\n\n", r"train\.tsv: the file is empty; expected the GLUE cola TSV"),
        ("rte", "index\tsentence1\tsentence2\tlabel\n", r"train\.tsv: no data rows found \(only a header\)"),
    ],
)
def test_empty_or_header_only_file_is_one_user_error(tmp_path, task, text, match):
    from melora.lab.args import UserError

    path = write(tmp_path / "train.tsv", text)
    with pytest.raises(UserError, match=match):
        read_tsv(get_task(task), path)


def test_missing_column_names_file_column_and_fix(tmp_path):
    from melora.lab.args import UserError

    path = write(tmp_path / "train.tsv", "sentence\n a\n")
    with pytest.raises(
        UserError, match=r"train\.tsv: expected a column 'label' in the header .*original GLUE"
    ):
        read_tsv(get_task("sst2"), path)


# every classification task: labels outside 0..num_labels-1 (or not a label name); STS-B outside [0, 5]
_HEADERS = {
    "sst2": "sentence\tlabel",
    "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "wnli": "index\tsentence1\tsentence2\tlabel",
    "qnli": "index\tquestion\tsentence\tlabel",
    "mnli": "index\tp1\tp2\tp3\tp4\tp5\tp6\tp7\tsentence1\tsentence2\tl1\tgold_label",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
}


def _row(task: str, label: str) -> str:
    if task == "cola":
        return f"gj04\t{label}\t\tA sentence."
    fields = _HEADERS[task].split("\t")
    row = ["x"] * len(fields)
    label_col = fields.index(get_task(task).label_column)
    row[label_col] = label
    return "\t".join(row)


@pytest.mark.parametrize(
    ("task", "bad"),
    [
        ("cola", "2"),
        ("cola", "-1"),
        ("sst2", "7"),
        ("sst2", "-1"),
        ("sst2", "1.0"),
        ("mrpc", "2"),
        ("qqp", "-1"),
        ("wnli", "3"),
        ("rte", "1"),
        ("qnli", "maybe"),
        ("mnli", "-"),
        ("stsb", "5.5"),
        ("stsb", "-0.1"),
        ("stsb", "nan"),
        ("stsb", "inf"),
    ],
)
def test_label_outside_the_task_range_names_file_line_and_range(tmp_path, task, bad):
    from melora.lab.args import UserError

    good = "0" if task not in ("rte", "qnli", "mnli") else "entailment"
    lines = ([] if task == "cola" else [_HEADERS[task]]) + [_row(task, good), _row(task, bad)]
    path = write(tmp_path / "train.tsv", "\n".join(lines) + "\n")
    line = 2 if task == "cola" else 3
    expected = {
        "stsb": r"a similarity score in \[0, 5\]",
        "mnli": "one of entailment, neutral, contradiction",
    }
    expected.update(rte="one of entailment, not_entailment", qnli="one of entailment, not_entailment")
    with pytest.raises(UserError, match=rf"train\.tsv, line {line}: label '{re.escape(bad)}' is not "
                                       rf"{expected.get(task, 'one of 0, 1')} \(GLUE {task}\)"):  # fmt: skip
        read_tsv(get_task(task), path)


def test_labels_at_the_ends_of_the_range_are_accepted(tmp_path):
    stsb = [_HEADERS["stsb"], _row("stsb", "0"), _row("stsb", "5.000")]
    assert read_tsv(get_task("stsb"), write(tmp_path / "s.tsv", "\n".join(stsb)))["label"] == [0.0, 5.0]
    sst2 = [_HEADERS["sst2"], _row("sst2", "0"), _row("sst2", "1")]
    assert read_tsv(get_task("sst2"), write(tmp_path / "t.tsv", "\n".join(sst2)))["label"] == [0, 1]


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    from melora.lab.args import UserError

    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n")
    with pytest.raises(
        UserError, match=r"train\.tsv, line 3: byte b'\\xe9' is not UTF-8 .*save the file as UTF-8"
    ):
        read_tsv(get_task("rte"), path)


def test_bad_train_file_fails_in_the_runner_before_any_model_is_loaded(tmp_path):
    """An out-of-range SST-2 label used to pass the loader and crash mid-training with IndexError."""
    from melora.lab.args import UserError
    from melora.lab.finetune.glue import GlueRun, run_glue

    write(tmp_path / "data" / "SST-2" / "train.tsv", "sentence\tlabel\ngood\t1\nbad\t7\n")
    write(tmp_path / "data" / "SST-2" / "dev.tsv", "sentence\tlabel\ngood\t1\n")
    run = GlueRun.from_options(
        {
            "task": "sst2",
            "model": str(tmp_path / "no-such-model"),
            "data_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "out"),
            "progress": False,
        }  # fmt: skip
    )
    with pytest.raises(
        UserError, match=r"SST-2.train\.tsv, line 3: label '7' is not one of 0, 1 \(GLUE sst2\)"
    ):
        run_glue(run)
