"""The errors melora raises on purpose, in the core so that every layer can import them downward.

- :class:`UserError`: a mistake in the user's input; the CLI prints it as one line and exits with 2.
- :class:`ConfigError`: a :class:`~melora.tuner.config.MELoRAConfig` with invalid fields; ``problems``
  lists each one (field, value, expectation, fix), so a caller can merge them into its own report.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input (a flag, a file, a preset); the CLI prints it as one line, exit 2."""


class ConfigError(ValueError):
    """Invalid fields of a MELoRAConfig: one message listing every problem; ``problems`` holds them one by one."""

    def __init__(self, problems: list[str], headline: str = "Invalid MELoRAConfig") -> None:
        self.problems = list(problems)
        super().__init__(f"{headline}:\n  - " + "\n  - ".join(self.problems))
