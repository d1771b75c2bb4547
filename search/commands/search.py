"""`stl10-search search` (create studies, launch workers, summarize) and `stl10-search worker`."""

from __future__ import annotations

import argparse
import signal
import threading
import time

from search.commands.options import print_search, say, search_request, worker_request
from search.launcher import watch_launcher
from search.services.searching import run_worker as serve, search


def run_search(args: argparse.Namespace) -> int:
    return print_search(search(search_request(args), say), args.json)


def run_worker(args: argparse.Namespace) -> int:
    request = worker_request(args)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stamped(f"worker: {signal.Signals(signum).name} received; stopping after the current epoch")
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    watch_launcher(stop)  # a launcher killed outright stops its workers too, their trials queued again
    done = serve(request, stop, stamped)
    stamped("worker finished: " + ", ".join(f"{name} {count} trial(s)" for name, count in done.items()))
    return 0


def stamped(message: str) -> None:
    """A worker's log line, with the time: its log file gathers the runs of every search that used it."""
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", flush=True)
