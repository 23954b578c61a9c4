"""The base classes of the errors a user can meet, so entry points print each as one line:
bad input (exit status 2) and faults of the machine or cluster (exit status 1)."""

from __future__ import annotations


class UserError(ValueError):
    """Input that cannot be used; the message names the problem and what to do."""


class Fault(RuntimeError):
    """Not the user's input: a trial that failed, a cluster that would not start, a full disk;
    the message names the cause and what to do (usually: the same command again)."""

    exit_status = 1


class Interrupted(Fault):
    """Stopped by the user (Ctrl-C) before the work was done; what finished is kept."""

    exit_status = 130  # the shell's status for a process ended by SIGINT

    def __init__(self, message: str, unfinished: list[str] | None = None) -> None:
        super().__init__(message)
        self.unfinished = unfinished or []


def one_line(error: BaseException | str) -> str:
    """An error's message on one line (library messages often carry newlines)."""
    return " ".join(str(error).split()) or type(error).__name__


def yaml_problem(error: Exception) -> str:
    """Where and what a YAML parse error is, in one line ("line 2, column 1: found character
    '\\t' that cannot start any token"), from PyYAML's marked errors."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or one_line(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{one_line(problem)}"
