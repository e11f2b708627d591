"""The progress line a running stage prints: counts, rates and ETA; redrawn in place on a terminal, plain lines
(at most one per interval, and the last always) elsewhere; and the log file every CLI run writes."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from guardray.progress import ProgressLine
from tests.conftest import small_spec, write_spec


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_count_prompts_errors_rates_and_eta() -> None:
    out = io.StringIO()
    line = ProgressLine("features", total=100, done=20, stream=out, every_s=0.0)
    line.advance(30, errors=2, tokens=900)
    line.advance(50, tokens=1500)
    line.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert re.fullmatch(r"features  50/100 prompts  2 errors  [\d,.]+ prompts/s  [\d,]+ tokens/s  ETA \d+:\d\d",
                        lines[0]), lines[0]
    assert lines[-1].startswith("features  100/100 prompts  2 errors") and " in " in lines[-1]


def test_plain_lines_are_rate_limited_but_the_last_is_always_shown() -> None:
    out = io.StringIO()
    line = ProgressLine("responses", total=10, stream=out, every_s=3600)
    line.advance(4)  # the first shard shows (nothing was shown yet), the next ones wait for the interval
    for _ in range(6):
        line.advance(1)
    line.close()
    assert [l.split("  ")[1] for l in out.getvalue().splitlines()] == ["4/10 prompts", "10/10 prompts"]


def test_a_terminal_gets_one_line_redrawn_in_place() -> None:
    out = Terminal()
    line = ProgressLine("features", total=2, stream=out)
    line.advance(1)  # shown: nothing was yet
    line.advance(1)  # not redrawn: within the redraw interval
    line.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "features  2/2 prompts" in text.rsplit("\r", 1)[1]


def test_cli_run_writes_a_private_log_file_and_names_it(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "job.yaml", small_spec(str(tmp_path / "out")))
    log = tmp_path / "logs" / "run.log"
    result = subprocess.run([sys.executable, "-m", "guardray", "--log-file", str(log), "run", str(spec),
                             "--stages", "dataset"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"log: {log}" in result.stderr.splitlines()
    assert "stage dataset: running" in log.read_text()
    default = subprocess.run([sys.executable, "-m", "guardray", "run", str(spec), "--stages", "dataset"],
                             capture_output=True, text=True, timeout=300)
    named = Path(next(l for l in default.stderr.splitlines() if l.startswith("log: "))[5:])
    assert named.exists() and named.stat().st_mode & 0o077 == 0  # private: it may hold prompts in errors


QUIET = """
import logging, sys
from pathlib import Path
from guardray import progress
logging.basicConfig(level=logging.INFO)
progress.set_verbose(False)  # as `guardray run` without --verbose
progress.log_to_file(Path(sys.argv[1]))
progress.quiet_ray_loggers()
for name in ("ray", "ray.data", "ray.tune"):
    logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger(name).info("chatter of %s", name)
    logging.getLogger(name).warning("a warning of %s", name)
logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster. Set ...")
logging.getLogger("guardray.runner").info("a line of guardray")
"""


def test_ray_chatter_goes_to_the_log_file_and_warnings_stay_on_the_console(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    result = subprocess.run([sys.executable, "-c", QUIET, str(log)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    console, written = result.stderr, log.read_text()
    for name in ("ray", "ray.data", "ray.tune"):
        assert f"chatter of {name}" in written and f"chatter of {name}" not in console
        assert f"a warning of {name}\n" in written and console.count(f"a warning of {name}\n") == 1
    assert "Token authentication is enabled" in written and "Token authentication" not in console
    assert "a line of guardray" in console and "a line of guardray" in written
