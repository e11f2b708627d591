"""What a user sees while a job runs: one progress line per running stage, and nothing of Ray's own chatter.

`ProgressLine` is fed by the driver as shards finish (the per-shard summaries the actors already return, so it
works the same on a cluster): prompts done of the total, errors, prompts/s and tokens/s of this run, and an ETA.
On a terminal the line is redrawn in place; elsewhere (`ray job logs`, a CI log, a file) a plain line is
printed at most every `every_s` seconds, and always when the stage ends.

`quiet_ray_loggers` (the CLI without `--verbose`) sends Ray's, Ray Data's and Tune's own log records (progress
bars, start-up notices, tables) to the run's log file instead of the console; warnings and errors of every logger
still reach the console, and guardray's own INFO lines stay; workers' output still reaches the driver. `--verbose`,
and any use from Python, leave the console as Ray makes it.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

#: loggers whose INFO records are Ray's own chatter (start-up, progress blocks, Tune's tables and hints)
CHATTY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "ray.air", "filelock", "urllib3")
#: loggers whose every record is a start-up notice (Ray's token-authentication notice, printed on each local run)
NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
#: redraws of an in-place line per second, at most
_TTY_REDRAW_S = 0.5


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class ProgressLine:
    """One stage's progress line: `features  96/272 prompts  0 errors  12.1 prompts/s  830 tokens/s  ETA 0:15`.

    `total` counts every prompt of the stage, `done` those an earlier run already finished (a resume): rates
    and the ETA are of this run's work only."""

    stage: str
    total: int
    done: int = 0
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    every_s: float = 10.0
    errors: int = 0
    tokens: int = 0
    _processed: int = 0
    _started: float = field(default_factory=time.monotonic)
    _shown: float = 0.0
    _width: int = 0

    @property
    def tty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def advance(self, prompts: int, errors: int = 0, tokens: int = 0) -> None:
        """A shard finished: `prompts` rows (of which `errors` failed) and the chat-model tokens it ran."""
        self._processed += prompts
        self.errors += errors
        self.tokens += tokens
        now = time.monotonic()
        if now - self._shown >= (_TTY_REDRAW_S if self.tty else self.every_s):
            self._show(now)

    def close(self) -> None:
        """The final line (always shown), ending the in-place line on a terminal."""
        self._show(time.monotonic(), final=True)

    def text(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._started, 1e-9)
        finished = self.done + self._processed
        parts = [f"{self.stage}", f"{finished:,}/{self.total:,} prompts", f"{self.errors:,} errors"]
        if self._processed:
            rate = self._processed / elapsed
            parts.append(f"{rate:,.1f} prompts/s")
            if self.tokens:
                parts.append(f"{self.tokens / elapsed:,.0f} tokens/s")
            remaining = max(self.total - finished, 0)
            parts.append(f"ETA {_clock(remaining / rate)}" if remaining else f"in {_clock(elapsed)}")
        return "  ".join(parts)

    def _show(self, now: float, final: bool = False) -> None:
        self._shown = now
        line = self.text(now)
        if self.tty:
            pad = " " * max(self._width - len(line), 0)  # clear what a longer earlier line left
            self.stream.write(f"\r{line}{pad}{chr(10) if final else ''}")
            self._width = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class _NotChatter(logging.Filter):
    """Drops, from the console only, the notices every local run repeats (they stay in the log file)."""

    NOTICES = ("Token authentication is enabled for this Ray cluster", "Progress bars disabled. To enable")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def log_to_file(log_file: Path) -> logging.Handler:
    """Every record at DEBUG and up also goes to `log_file` (the run's full log, whatever the console shows).
    The file is private (0600) and never followed through a symlink; the handler is returned for removal."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("guardray-log-file")
    logging.getLogger().addHandler(handler)
    return handler


def stop_logging_to(handler: logging.Handler) -> None:
    """Detach and close a `log_to_file` handler (from the root and every logger it was added to)."""
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in (*CHATTY_LOGGERS, *NOTICE_LOGGERS))]:
        logger.removeHandler(handler)
    handler.close()


def quiet_ray_loggers() -> None:
    """Ray's, Ray Data's and Tune's loggers: INFO to the log file only, WARNING and up still on the console.

    Called once Ray and Ray Data are imported (their imports install their own console handlers, which is
    what this turns down); a no-op with `--verbose`."""
    if verbose():
        return
    # Tune's and Train's console reporter prints its experiment table and a TensorBoard hint even at verbose=0;
    # the classic reporter prints nothing at verbose=0 (results and errors still reach the stage as values)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray.data  # noqa: F401 - its import configures the ray.data logger; quiet it after that

    to_file = next((h for h in logging.getLogger().handlers if h.get_name() == "guardray-log-file"), None)
    for name in CHATTY_LOGGERS:
        chatty = logging.getLogger(name)
        consoles = [h for h in chatty.handlers if not isinstance(h, logging.FileHandler)]
        if not consoles and not chatty.propagate:
            continue  # no console of its own and not reaching the root's: nothing to turn down
        if not consoles:  # it reached the console through the root: give it a console of its own
            consoles = [logging.StreamHandler(sys.stderr)]
            chatty.addHandler(consoles[0])
        for handler in consoles:
            handler.setLevel(logging.WARNING)
            handler.addFilter(_NotChatter())
        if to_file is not None and to_file not in chatty.handlers:
            chatty.addHandler(to_file)
        chatty.propagate = False
    for name in NOTICE_LOGGERS:  # their notices would reach the console by logging's last resort: file only
        notices = logging.getLogger(name)
        notices.propagate = False
        if to_file is not None and to_file not in notices.handlers:
            notices.addHandler(to_file)


#: The CLI turns Ray's console down unless `--verbose`; a library user (`guardray.run` in a notebook) keeps
#: logging as it is: quieting is the command line's choice, not a side effect of importing guardray.
_VERBOSE = True


def verbose() -> bool:
    """Whether this process shows Ray's own output on the console (library default; `guardray --verbose`)."""
    return _VERBOSE


def set_verbose(value: bool) -> None:
    global _VERBOSE
    _VERBOSE = value
