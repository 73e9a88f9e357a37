"""The two layers: the core (what ``pip install melora`` gives a PEFT user) never imports the lab or the
lab's dependencies, and a save / load / export round trip in an environment without them prints nothing.

The core is every module of ``src/melora`` outside ``melora/lab/`` but the ``melora`` command itself
(``cli.py``, which imports a lab command's module by name only when that command runs).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "melora"
# What a PEFT user must not get from `pip install melora` (the lab's and the extras' packages).
LAB_ONLY = [
    "pandas",
    "pyarrow",
    "matplotlib",
    "sklearn",
    "scipy",
    "datasets",
    "gguf",
    "sentencepiece",
    "rich",
    "bitsandbytes",
    "torchao",
    "hqq",
    "trl",
    "lm_eval",
    "deepspeed",
    "yaml_include",
]
LAB_ONLY_DISTRIBUTIONS = [
    "pandas",
    "pyarrow",
    "matplotlib",
    "scikit-learn",
    "scipy",
    "datasets",
    "gguf",
    "sentencepiece",
    "rich",
    "bitsandbytes",
    "torchao",
    "hqq",
    "trl",
    "lm-eval",
    "deepspeed",
]
CORE_DEPENDENCIES = {"torch", "transformers", "peft", "safetensors"}


def core_modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if "lab" not in p.relative_to(PACKAGE).parts and p.name != "cli.py"
    )


def imported_names(path: Path, top_level_only: bool = False) -> list[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth (lazy imports too)."""
    names = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


QUANT = ("bitsandbytes", "torchao", "hqq")  # the quant extra: the tuner may import them inside a function


def test_the_core_imports_neither_the_lab_nor_its_packages():
    modules = core_modules()
    assert PACKAGE / "tuner" / "layer.py" in modules and PACKAGE / "export.py" in modules
    problems = []
    for path in modules:
        top_level = set(imported_names(path, top_level_only=True))
        for name in imported_names(path):
            root = name.split(".")[0]
            lazy_quant = root in QUANT and name not in top_level
            lab = name == "melora.lab" or name.startswith("melora.lab.")
            if lab or (root in LAB_ONLY and not lazy_quant) or root in ("yaml", "tqdm", "accelerate"):
                problems.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert problems == []


def test_the_lab_is_a_sub_package_the_core_knows_nothing_of():
    lab = PACKAGE / "lab"
    assert (lab / "__init__.py").is_file()
    for name in ("args.py", "finetune", "data", "eval", "study", "bench", "report.py", "models.py"):
        assert (lab / name).exists(), f"melora/lab/{name} is missing"
        assert not (PACKAGE / name).exists(), f"melora/{name} is still outside the lab"


def _requirements(dist: str) -> list[str]:
    """Names of the distributions ``dist`` requires unconditionally (no extra, and markers true here)."""
    from packaging.requirements import Requirement

    found = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        found.append(re.sub(r"[-_.]+", "-", req.name).lower())
    return found


def test_pip_install_melora_without_extras_pulls_no_lab_package():
    """The closure of the core's declared dependencies, read from the installed packages' metadata."""
    declared = [re.sub(r"[-_.]+", "-", n).lower() for n in _requirements("melora")]
    assert set(declared) == CORE_DEPENDENCIES, declared
    seen, todo = set(), list(declared)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requirements(name)
        except metadata.PackageNotFoundError:  # an optional platform package not installed here
            continue
    # transformers 5 itself pulls rich (through typer, for its own command line): not melora's doing.
    pulled_by_transformers = {"rich"}
    lab_only = {re.sub(r"[-_.]+", "-", d).lower() for d in LAB_ONLY_DISTRIBUTIONS} - pulled_by_transformers
    assert sorted(seen & lab_only) == []


ROUND_TRIP = r"""
import sys
for name in LAB_ONLY:                        # as if not installed: import fails, find_spec says None
    sys.modules[name] = None
import copy, tempfile, torch
import melora
from melora import MELoRAConfig, export_lora, save_adapter
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=120)).eval()
if METHOD == "melora":
    config = MELoRAConfig(r=1, n=4, target_modules=["q_proj", "v_proj"], init_weights=False)
else:
    from peft import LoraConfig
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
model = get_peft_model(copy.deepcopy(base), config).eval()
ids = torch.tensor([[1, 5, 9, 2]])
with tempfile.TemporaryDirectory() as d:
    save_adapter(model, d + "/a")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), d + "/a").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    if METHOD == "melora":
        export_lora(loaded, d + "/lora")
        lora = PeftModel.from_pretrained(copy.deepcopy(base), d + "/lora").eval()
        torch.testing.assert_close(lora(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("melora"))))
"""


def _round_trip(method: str) -> subprocess.CompletedProcess:
    script = f"import json\nLAB_ONLY = {json.dumps(LAB_ONLY)}\nMETHOD = {method!r}\n" + ROUND_TRIP
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_a_round_trip_without_the_lab_packages_works_and_adds_nothing_to_stderr():
    """Save, load and export a MELoRA Llama with the lab's packages hidden. Its stderr must be exactly what
    the same round trip with PEFT's own LoRA prints (transformers' deprecation notices about PEFT, if any):
    melora itself adds nothing."""
    melora_run, lora_run = _round_trip("melora"), _round_trip("lora")
    assert melora_run.returncode == 0, melora_run.stderr[-3000:]
    assert lora_run.returncode == 0, lora_run.stderr[-3000:]
    assert melora_run.stderr == lora_run.stderr, melora_run.stderr[-3000:]
    loaded = json.loads(melora_run.stdout.strip().splitlines()[-1])
    assert "melora.tuner" in loaded and not [m for m in loaded if m.startswith("melora.lab")]
