"""The run schema's adapter options: MELoRAConfig's rules, applied once; only method-specific checks here."""

from __future__ import annotations

import pytest

from melora.errors import UserError as CoreUserError
from melora.lab.args import AdapterArgs, UserError
from melora.tuner.config import MELoRAConfig


def test_user_error_lives_in_the_core_and_is_reexported():
    assert UserError is CoreUserError and issubclass(UserError, ValueError)
    assert UserError.__doc__.startswith("A mistake in the user's input")


@pytest.mark.parametrize(
    ("method", "field", "value"),
    [
        ("melora", "r", 0),
        ("melora", "n", 0),
        ("melora", "alpha", float("nan")),
        ("melora", "dropout", 1.5),
        ("lora", "r", -2),
        ("lora", "alpha", 0),
        ("lora", "dropout", -0.1),
    ],
)
def test_adapter_options_report_the_configs_own_message(method, field, value):
    """One home per rule: the runner's error carries exactly MELoRAConfig's sentence for the field."""
    (expected,) = MELoRAConfig.hyperparameter_problems(**{field: value})
    with pytest.raises(UserError, match=r"^Invalid adapter options: ") as info:
        AdapterArgs(method, **{field: value})
    assert expected.removesuffix(".") in str(info.value)


def test_adapter_options_collect_method_and_config_problems():
    with pytest.raises(UserError) as info:
        AdapterArgs("lora", n=4, r=0, dropout=2.0)
    message = str(info.value)
    assert message.startswith(
        "Invalid adapter options: n=4: n applies to MELoRA only; drop it for --method lora; "
    )
    assert "r=0: the rank of each mini LoRA must be an integer >= 1 (e.g. r=1)" in message
    assert "dropout=2.0: must lie in [0, 1) and be a number (e.g. dropout=0.05)" in message
    assert message.endswith(".") and "\n" not in message  # one line for the CLI


def test_patterns_are_checked_when_the_options_are_built():
    """A bad per-module value fails before any model is loaded, with the config's message."""
    with pytest.raises(UserError, match=r"n_pattern\['v_proj'\]=0: must be an integer >= 1"):
        AdapterArgs("melora", n_pattern={"v_proj": 0})
    with pytest.raises(UserError, match=r"alpha_pattern\['q'\]=-1: must be a finite number > 0"):
        AdapterArgs("lora", alpha_pattern={"q": -1})


def test_full_fine_tuning_ignores_adapter_hyperparameters():
    args = AdapterArgs("full", r=0, n=0)
    assert (args.r, args.n, args.label, args.slug) == (None, None, "full", "full")
    assert args.peft_config() is None
