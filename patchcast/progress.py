"""Progress bars for long offline jobs (``patchcast eval``, ``patchcast eval-region``): one bar per phase."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

ProgressFn = Callable[[str, int, int, str], None]
"""``(phase, done, total, info)``: a long job reports how far one of its phases is."""


@contextlib.contextmanager
def phase_bars(labels: Mapping[str, str]) -> Iterator[ProgressFn]:
    """Rich progress bars on stderr: the yielded ``(phase, done, total, info)`` callback adds a bar for a
    phase the first time it reports (titled ``labels[phase]``, else the phase name) and moves it on."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=False) as progress:
        tasks: dict[str, TaskID] = {}

        def on_progress(phase: str, done: int, total: int, info: str) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(labels.get(phase, phase), total=total, info="")
            progress.update(tasks[phase], completed=done, total=total, info=info)

        yield on_progress
