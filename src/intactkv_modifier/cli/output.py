"""What the ``intactkv`` command lets through to the terminal.

The libraries underneath are loud: llm-compressor logs a METRIC line per
quantized layer (at a level above WARNING, so a level threshold alone lets it
through) and warns on every CPU run that no accelerator is available; tqdm,
transformers and datasets draw nested progress bars. At the default verbosity
the command shows its own progress (one bar per long step), warnings that need
the user, and the result; ``-v`` gives the libraries' own output back; ``-q``
leaves only the result and errors.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from loguru import logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    import torch

__all__ = [
    "Verbosity", "configure_output", "library_output", "perplexity_with_progress", "reports_errors", "results",
    "step",
]

#: Results go to stdout; progress, logs and errors to stderr, so ``intactkv eval ... > table.txt`` keeps only results.
results = Console(highlight=False, soft_wrap=True)
_status = Console(stderr=True, highlight=False)

#: Library messages hidden at the default verbosity although they are warnings: noise on every CPU run.
_NOISE = ("No accelerator available",)


class Verbosity(IntEnum):
    QUIET = 0
    NORMAL = 1
    VERBOSE = 2


_verbosity = Verbosity.NORMAL
_LOG_THRESHOLD = {Verbosity.QUIET: "ERROR", Verbosity.NORMAL: "WARNING", Verbosity.VERBOSE: "INFO"}


def configure_output(verbose: bool, quiet: bool) -> Verbosity:
    """Set the verbosity from ``-v``/``-q`` for :func:`library_output` and :func:`step`."""
    global _verbosity
    if verbose and quiet:
        raise typer.BadParameter("-v and -q exclude each other")
    _verbosity = Verbosity.VERBOSE if verbose else Verbosity.QUIET if quiet else Verbosity.NORMAL
    # what oneshot would set, with a warning, to keep tokenizers' threads out of datasets' worker processes
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _verbosity


def _library_log_filter(record: dict[str, Any]) -> bool:
    if _verbosity < Verbosity.VERBOSE and (
        record["level"].name == "METRIC" or any(noise in record["message"] for noise in _NOISE)
    ):
        return False
    return record["level"].no >= logger.level(_LOG_THRESHOLD[_verbosity]).no


@contextmanager
def library_output() -> Iterator[None]:
    """Route loguru, transformers, datasets, tqdm and Python warnings by the verbosity, for the block's duration.

    Enter it after importing :mod:`intactkv_modifier`: importing llm-compressor
    replaces loguru's sinks with its own stdout sink, which this removes.
    """
    import datasets
    import transformers

    quiet_libraries = _verbosity < Verbosity.VERBOSE
    logger.remove()
    # looked up at each message, so a swapped sys.stderr (tests, redirection) is honoured
    sink = logger.add(lambda message: sys.stderr.write(message), filter=_library_log_filter, level=0,
                      format="{level}: {message}" if quiet_libraries else "{time:HH:mm:ss} | {level} | {message}")
    transformers_level = transformers.utils.logging.get_verbosity()
    torch_logger = logging.getLogger("torch")  # torch.fx warns through it while llm-compressor traces layers
    torch_level = torch_logger.level
    with warnings.catch_warnings(), _tqdm_disabled(quiet_libraries):
        if quiet_libraries:
            warnings.simplefilter("ignore")
            torch_logger.setLevel(logging.ERROR)
            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
            datasets.disable_progress_bars()
        try:
            yield
        finally:
            transformers.utils.logging.set_verbosity(transformers_level)
            torch_logger.setLevel(torch_level)
            transformers.utils.logging.enable_progress_bar()
            datasets.enable_progress_bars()
            logger.remove(sink)
            logger.add(lambda message: sys.stderr.write(message), level="INFO")


@contextmanager
def _tqdm_disabled(disabled: bool) -> Iterator[None]:
    """Every tqdm bar created in this block is disabled (``TQDM_DISABLE`` would only count before tqdm's import)."""
    import tqdm.std

    original = tqdm.std.tqdm.__init__
    if disabled:
        @wraps(original)
        def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            original(self, *args, **kwargs)

        tqdm.std.tqdm.__init__ = silent_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original  # type: ignore[method-assign]


@contextmanager
def step(label: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """One progress line for a long step (a bar when ``total`` is known); yields ``advance(n)``."""
    if _verbosity == Verbosity.QUIET:
        yield lambda _: None
        return
    columns = [SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=_status) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
        progress.update(task, total=total or 1, completed=total or 1)


def perplexity_with_progress(model: torch.nn.Module, windows: torch.Tensor, label: str, batch_size: int = 8) -> float:
    """:func:`~intactkv_modifier.eval.perplexity.perplexity` batch by batch under one progress bar.

    Exact: every window has the same length, so the mean NLL over all windows is
    the window-weighted mean of the batches' mean NLLs.
    """
    from intactkv_modifier.eval.perplexity import perplexity

    total_log = 0.0
    with step(f"perplexity, {label}", total=windows.shape[0]) as advance:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            total_log += math.log(perplexity(model, batch, batch_size, desc=label)) * batch.shape[0]
            advance(batch.shape[0])
    return math.exp(total_log / windows.shape[0])


F = TypeVar("F", bound=Callable[..., Any])

#: Errors whose message already says what is wrong; anything else also names its type.
_EXPECTED = (FileNotFoundError, ValueError, OSError, ImportError)


def reports_errors(command: F) -> F:
    """Turn an exception into one line on stderr and exit status 1; ``-v`` adds the traceback."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except Exception as error:
            if _verbosity == Verbosity.VERBOSE:
                _status.print(traceback.format_exc(), markup=False)
            message = " ".join(str(error).split())
            if not isinstance(error, _EXPECTED):
                message = f"{type(error).__name__}: {message} (run with -v for the traceback)"
            _status.print(f"error: {message}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from error

    return run  # type: ignore[return-value]
