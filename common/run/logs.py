"""Console and log files: fedshop's own lines on the console, everything (third-party INFO, warnings) in the file.

Hydra's job_logging (conf/hydra/job_logging/fedshop.yaml) installs the console filter and formatter below; the
merchant side appends one line per message it handles to a file its launcher shows (client/__main__.py).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

OWN = ("fedshop", "common", "server", "client", "simulation", "serving", "bench")


class Console(logging.Filter):
    """fedshop's own records from INFO up; other libraries' only from ERROR up (the rest goes to the file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True when the record belongs on the console."""
        own = record.name.split(".", 1)[0] in OWN
        return record.levelno >= (logging.INFO if own else logging.ERROR)


class ConsoleFormat(logging.Formatter):
    """`12:01:07 round 2 | ...`; warnings and errors say so."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        """One console line."""
        line = super().format(record)
        if record.levelno >= logging.WARNING:
            stamp, _, rest = line.partition(" ")
            return f"{stamp} {record.levelname.lower()}: {rest}"
        return line


def warnings_to_log() -> None:
    """Python warnings (a library's FutureWarning) become records of `py.warnings`: in the file, off the console."""
    logging.captureWarnings(True)


_WARNINGS_FILES: set[str] = set()


def warnings_to_file(path: Path) -> None:
    """In a merchant process (Ray actor, task process): its warnings and Flower's lines go to `path`, not its
    stderr."""
    if str(path) in _WARNINGS_FILES:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, delay=True)  # appends, as the launcher's own handler of that file does
    handler.setFormatter(logging.Formatter(f"[%(asctime)s][merchant pid {os.getpid()}][%(name)s] - %(message)s"))
    logger = logging.getLogger("py.warnings")
    logger.addHandler(handler)
    logger.propagate = False
    logging.captureWarnings(True)
    # Flower's own lines in a Ray actor ("Manually terminating ClientAppActor") would reach the driver's console
    logging.getLogger("flwr").handlers = [handler]
    _WARNINGS_FILES.add(str(path))


def append_line(path: Path, text: str) -> None:
    """Append one timestamped line (one write: lines of concurrent merchants do not interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"{time.strftime('%H:%M:%S')} {text}\n")
