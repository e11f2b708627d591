"""Error types that the CLI maps to exit codes.

`InputError` (exit 2) is the user's to fix: a bad spec, a missing file, a wrong column.
Anything else raised while running is a failure (exit 1); `StageError` is such a failure with a one-line reason.
"""
from __future__ import annotations


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line (whitespace collapsed), cut to `limit` characters, for logs and reasons."""
    return " ".join(str(error).split())[:limit]


class InputError(Exception):
    """Invalid user input. The message is one line per problem, naming the field, file or row."""


class SpecError(InputError):
    """The job spec failed validation; `problems` lists every error found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StageError(RuntimeError):
    """A stage failed for a reason it can state in one line (error budget, exactly-once check); exit 1."""


def ray_get(refs: object) -> object:
    """`ray.get` that re-raises guardray's one-line errors (bad input, a failed stage) from a remote task as
    themselves, so the CLI prints one line and exits 2 or 1 instead of a wrapped traceback."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (InputError, StageError)):
            raise e.cause from None
        raise
