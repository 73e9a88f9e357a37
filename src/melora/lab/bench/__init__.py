"""Speed, memory and parameter benchmarks: MELoRA against LoRA, GraLoRA, the per-block loop and the base.

Python API::

    from melora.lab.bench import experiment_from_dict, run_experiment, render_markdown, render_plot
    results = run_experiment(experiment_from_dict(read_yaml("benchmarks/layer.yaml")))

The command line is ``melora bench`` (:mod:`melora.lab.bench.runner`).
"""

from melora.lab.bench.benchmark import run_experiment
from melora.lab.bench.config import Experiment, LayerShape, MethodSpec, ModelCase, experiment_from_dict
from melora.lab.bench.render import render_markdown, render_plot

__all__ = [
    "Experiment",
    "LayerShape",
    "MethodSpec",
    "ModelCase",
    "experiment_from_dict",
    "render_markdown",
    "render_plot",
    "run_experiment",
]
