"""The lab: runners (glue, instruct, eval), data, studies, reports, benchmarks and model aliases.

Installed with the ``lab`` extra (``pip install 'melora[lab]'``). It imports the core (``melora``,
``melora.tuner``, ``melora.export``, ...); the core never imports the lab.
"""
