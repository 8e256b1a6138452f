"""What the console shows: the results and the progress, not every library's start-up lines.

`cxr -v` keeps all of them; otherwise TensorFlow's C++ start-up lines (CUDA stubs, CPU features),
MLflow's database set-up lines and progress bars and, in Ray workers, everything but warnings
stay off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator


def quiet_third_parties() -> None:
    """Before TensorFlow or MLflow load: their own log levels."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow draws a progress bar for each artifact it downloads (the registry's models, the
    # report's predictions): dozens of lines on a console that shows results
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """The process's file descriptor 2 sent to /dev/null for a while: TensorFlow's C++ library
    writes its start-up lines (absl, CUDA stubs) there when it loads, before TF_CPP_MIN_LOG_LEVEL
    applies. Python exceptions raised inside still propagate, and print once it is restored."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (and Keras) with its C++ start-up lines kept off the console."""
    with stderr_silenced():
        import keras  # noqa: F401
        import tensorflow  # noqa: F401


def progress_bar(enabled: bool = True):
    """The one progress bar of the CLI's long loops (decoding the store, predicting):
    description, bar, done/total, time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
