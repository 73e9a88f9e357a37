"""The GLUE TSV loader: layouts, label mapping, errors, and the real files when present."""

from pathlib import Path

import pytest

from melora.data.glue import TASKS, get_task, load_glue, read_tsv, subsample

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
