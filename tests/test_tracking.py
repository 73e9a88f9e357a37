"""--report-to: the trackers of Trainer's report_to, checked before loading, logging under the run folder."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from melora.lab.args import TrainArgs, UserError
from melora.lab.finetune.glue import GlueRun, run_glue
from melora.lab.finetune.training import training_arguments
from tests.test_glue_runner import parse, tiny_config
from tests.tiny_models import write_tiny_glue

# A stand-in for tensorboardX (transformers' second choice for TensorBoard): same SummaryWriter calls, and
# an events file per writer holding the scalars, so the test needs no tracker installed.
FAKE_TENSORBOARDX = """
import os


class SummaryWriter:
    def __init__(self, log_dir=None, **kwargs):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "events.out.tfevents.fake")
        open(self.path, "a").close()

    def add_scalar(self, tag, value, global_step=None, **kwargs):
        with open(self.path, "a") as handle:
            handle.write(f"{tag} {value} {global_step}\\n")

    def __getattr__(self, name):  # add_text, add_hparams, flush, close, ...
        return lambda *args, **kwargs: None
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_glue(tmp_path_factory.mktemp("tiny"))


def test_report_to_defaults_to_none_and_takes_one_or_several_trackers(tmp_path):
    assert TrainArgs(output_dir=str(tmp_path)).report_to == ["none"]
    assert TrainArgs(output_dir=str(tmp_path), report_to="wandb").report_to == ["wandb"]  # a preset's string
    flags = vars(
        parse(["--task", "rte", "--report-to", "tensorboard", "mlflow", "--output-dir", str(tmp_path)])
    )
    run = GlueRun.from_options(flags)
    assert run.train.report_to == ["tensorboard", "mlflow"]
    assert run.to_dict()["report_to"] == ["tensorboard", "mlflow"]  # recorded in results.json's config
    assert training_arguments(run.train, tmp_path).report_to == ["tensorboard", "mlflow"]
    assert (
        training_arguments(TrainArgs(output_dir=str(tmp_path)), tmp_path).report_to == []
    )  # none: no tracker


def test_unknown_or_contradictory_trackers_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--task", "rte", "--report-to", "neptune", "--output-dir", str(tmp_path)])
    assert "invalid choice: 'neptune'" in capsys.readouterr().err
    with pytest.raises(
        UserError, match=r"report_to=\['comet'\]: choose from tensorboard, trackio, wandb, mlflow"
    ):
        TrainArgs(output_dir=str(tmp_path), report_to=["comet"])
    with pytest.raises(UserError, match=r"'none' cannot be combined with a tracker"):
        TrainArgs(output_dir=str(tmp_path), report_to=["none", "wandb"])


def test_a_tracker_that_is_not_installed_is_one_user_error_before_loading(tiny, tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the trackers were checked")

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr("melora.lab.data.glue.load_glue", no_data)
    with pytest.raises(
        UserError, match=r"^--report-to wandb: not installed; install it with `pip install wandb`"
    ):
        run_glue(tiny_config(tiny, tmp_path, report_to=["wandb"]))
    assert not (tmp_path / "checkpoints").exists()


def test_tensorboard_logs_of_a_tiny_glue_run_land_under_the_run_folder(tiny, tmp_path, monkeypatch):
    """Offline, with a stand-in tensorboardX writer: the Trainer got --report-to and logged through it."""
    module_file = tmp_path / "fake" / "tensorboardX.py"
    module_file.parent.mkdir()
    module_file.write_text(FAKE_TENSORBOARDX)
    spec = importlib.util.spec_from_file_location("tensorboardX", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "tensorboardX", module)  # found by transformers' availability check
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: the real-writer test below covers it")
    run_glue(tiny_config(tiny, tmp_path / "run", epochs=1, save_model=False, report_to=["tensorboard"]))
    events = list((tmp_path / "run").rglob("events.out.tfevents*"))
    assert len(events) == 1 and events[0].parent.parent == tmp_path / "run" / "checkpoints" / "runs"
    assert "train/loss" in events[0].read_text() or "train/train_loss" in events[0].read_text()


def test_real_tensorboard_writes_event_files_under_the_run_folder(tiny, tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip(
            "tensorboard is not installed (pip install tensorboard); the stand-in writer test covers it"
        )
    run_glue(tiny_config(tiny, tmp_path, epochs=1, save_model=False, report_to=["tensorboard"]))
    events = list((tmp_path / "checkpoints" / "runs").rglob("events.out.tfevents*"))
    assert events and all(path.stat().st_size > 0 for path in events)
