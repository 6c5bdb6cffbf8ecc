"""The interface every backend implements, and the error for one that cannot run here."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendUnavailableError(RuntimeError):
    """The backend a model file needs is not installed or not usable on this machine."""


class Backend(Protocol):
    """Runs one model: named inputs in, outputs in the model's order out."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]: ...
