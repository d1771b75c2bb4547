"""Live progress of a search, and its closing summary: what a user watches while the workers run.

On a terminal, one tqdm bar per study (stacked, so no study is ever cut off at 80 columns) under a header line
with the elapsed time, the ETA and what is left of the time budget. tqdm because it is already a dependency,
redraws stacked bars in place on any terminal and sizes each bar to the width; rich would add a dependency for
the same picture. Without a terminal (a pipe, CI, a SLURM log) it writes one plain, timestamped line per study
whose counts changed, and every `quiet_seconds` all the same, never a control character.
"""

from __future__ import annotations

import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime
from typing import IO

from tqdm import tqdm

from search.studies import Counts

SUMMARY_WIDTH = 100


@dataclass(frozen=True)
class StudyStatus:
    """One study as the progress display sees it at one moment."""

    name: str
    budget: int | None  # finished trials the study asks for; None when only a time budget ends it
    counts: Counts
    best: float | None  # best validation accuracy so far
    deadline: float | None  # UTC seconds, when a time budget ends the study

    @property
    def finished(self) -> str:
        """"7/20" against the trial budget, or "7" when only a time budget ends it."""
        return f"{self.counts.finished}/{self.budget}" if self.budget else str(self.counts.finished)

    def counts_text(self) -> str:
        counts = self.counts
        return (f"{counts.complete} ok, {counts.pruned} pruned, {counts.failed} failed, {counts.running} running"
                + (f", {counts.waiting} queued" if counts.waiting else "")
                + (f", {counts.interrupted} interrupted" if counts.interrupted else ""))

    def best_text(self) -> str:
        return f"best {self.best:.1%}" if self.best is not None else "best -"


def clock(seconds: float | None) -> str:
    """1:02:03 or 2:03; "-" for unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Rates:
    """Each study's trial rate since it started finishing trials in this search, for an ETA."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[float, int]] = {}  # study -> (when it first ran here, finished then)

    def eta(self, status: StudyStatus, now: float) -> float | None:
        """Seconds until the study's trial budget is met at its rate so far, capped by its deadline."""
        if status.name not in self._first and (status.counts.running or status.counts.finished):
            self._first[status.name] = (now, status.counts.finished)
        left_by_clock = status.deadline - time.time() if status.deadline is not None else None
        if status.budget is None or status.name not in self._first:
            return left_by_clock
        started, finished_then = self._first[status.name]
        done_here = status.counts.finished - finished_then
        remaining = max(status.budget - status.counts.finished, 0)
        by_rate = remaining * (now - started) / done_here if done_here else None
        if remaining == 0:
            by_rate = 0.0
        known = [s for s in (by_rate, left_by_clock) if s is not None]
        return min(known) if known else None


class ProgressDisplay:
    """Shows `StudyStatus` snapshots as they come: bars on a terminal, plain lines elsewhere."""

    def __init__(self, stream: IO[str] | None = None, quiet_seconds: float = 60.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet_seconds = quiet_seconds
        self.started = time.monotonic()
        self.rates = Rates()
        self._bars: dict[str, tqdm] = {}
        self._header: tqdm | None = None
        self._last: dict[str, tuple[str, float]] = {}  # plain mode: study -> (its last line, when written)

    def show(self, statuses: list[StudyStatus]) -> None:
        now = time.monotonic()
        etas = [self.rates.eta(status, now) for status in statuses]
        if self.tty:
            self._draw(statuses, etas, now)
        else:
            self._write(statuses, etas, now)

    def _header_text(self, statuses: list[StudyStatus], etas: list[float | None], now: float) -> str:
        deadlines = [s.deadline for s in statuses if s.deadline is not None]
        pending = [eta for status, eta in zip(statuses, etas) if status.counts.finished < (status.budget or 0)
                   or status.budget is None]
        eta = max((e for e in pending if e is not None), default=None) if pending else 0.0
        return (f"search: {clock(now - self.started)} elapsed, ETA {clock(eta)}"
                + (f", time budget left {clock(max(deadlines) - time.time())}" if deadlines else ""))

    def _draw(self, statuses: list[StudyStatus], etas: list[float | None], now: float) -> None:
        if self._header is None:
            self._header = tqdm(total=0, file=self.stream, bar_format="{desc}", position=0, dynamic_ncols=True)
        self._header.set_description_str(self._header_text(statuses, etas, now), refresh=False)
        self._header.refresh()
        width = max(len(s.name) for s in statuses)
        for index, (status, eta) in enumerate(zip(statuses, etas), start=1):
            bar = self._bars.get(status.name)
            if bar is None:
                bar = self._bars[status.name] = tqdm(
                    total=status.budget, file=self.stream, position=index, dynamic_ncols=True, leave=True,
                    desc=status.name.ljust(width),  # tqdm puts ", " before the postfix
                    bar_format="{desc} {n_fmt}" + ("/{total_fmt} {bar}" if status.budget else "") + "{postfix}")
            bar.n = status.counts.finished
            bar.set_postfix_str(f"{status.counts.complete} ok {status.counts.pruned} pruned {status.counts.failed} "
                                f"failed {status.counts.running} run, {status.best_text()}, ETA {clock(eta)}",
                                refresh=False)
            bar.refresh()

    def _write(self, statuses: list[StudyStatus], etas: list[float | None], now: float) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        for status, eta in zip(statuses, etas):
            line = f"{status.name}: {status.finished} finished ({status.counts_text()}), {status.best_text()}"
            last, when = self._last.get(status.name, ("", -float("inf")))
            if line != last or now - when >= self.quiet_seconds:
                print(f"[{stamp}] {line}; ETA {clock(eta)}", file=self.stream, flush=True)
                self._last[status.name] = (line, now)

    def close(self) -> None:
        for bar in [*self._bars.values(), *([self._header] if self._header else [])]:
            bar.close()


def summary_lines(rows: list[tuple[str, ...]], notes: list[str], width: int = SUMMARY_WIDTH) -> str:
    """A table (first column left-aligned, the rest right-aligned) and notes, within `width` columns.

    When the first column (long study names) makes the table too wide, each name gets a line of its own
    above its figures.
    """
    table = _aligned(rows)
    if max(map(len, table)) > width:
        figures = _aligned([row[1:] for row in rows], first_left=False)
        table = ["  " + figures[0]] + [line for row, numbers in zip(rows[1:], figures[1:])
                                       for line in (row[0], "  " + numbers)]
    wrapped = [line for note in notes for line in textwrap.wrap(note, width, subsequent_indent="  ")]
    return "\n".join(table + wrapped)


def _aligned(rows: list[tuple[str, ...]], first_left: bool = True) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 and first_left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
