"""Live progress of a load test on the terminal (rich), refreshed a few times a second."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from producer.loadtest.runner import Snapshot
from producer.loadtest.stats import percentiles


def render(snapshot: Snapshot, title: str) -> Group:
    """The live view of one snapshot: a time bar and one row of counters."""
    bar = ProgressBar(total=snapshot.duration_s, completed=min(snapshot.elapsed_s, snapshot.duration_s), width=60)
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column in ("elapsed", "sent", "ok", "errors", "in flight", "queue", "p50 (recent)", "p99 (recent)"):
        table.add_column(column, justify="right")
    p50, p99 = percentiles(snapshot.recent_latencies_ms, (50, 99))
    expected = f"/{snapshot.expected}" if snapshot.expected is not None else ""
    table.add_row(
        f"{snapshot.elapsed_s:5.1f}/{snapshot.duration_s:g} s",
        f"{snapshot.sent}{expected}",
        str(snapshot.ok),
        f"[red]{snapshot.errors}[/red]" if snapshot.errors else "0",
        str(snapshot.inflight),
        "-" if snapshot.queue_ready is None else str(snapshot.queue_ready),
        "-" if p50 != p50 else f"{p50:.1f} ms",
        "-" if p99 != p99 else f"{p99:.1f} ms",
    )
    return Group(table, bar)


class LiveView:
    """A context manager whose :meth:`update` redraws the view; silent when the console is not a terminal."""

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.title = title
        self.console = console or Console(stderr=True)
        self._live: Live | None = None

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def update(self, snapshot: Snapshot) -> None:
        """Redraw with ``snapshot``."""
        if self._live is not None:
            self._live.update(render(snapshot, self.title))
