"""torchrun with a one-line ending when a process fails (``scripts/launch.sh`` runs every multi-process job through it).

    python -m utils.launch [torchrun options] -m MODULE [ARGS ...]

The same launcher as ``torchrun`` (``torch.distributed.run``: the same options, rendezvous and elastic agent, which
stops every process when one fails), except for how a failure ends. ``torchrun`` prints its own Python traceback and a
failure table (about 40 lines) under the message of the process that failed, and exits with 1. Here the processes'
own output stays the last thing worth reading: one line names the failed ranks and their exit codes, and the exit
code is the first failure's, so a user error (exit 2, one ``error: ...`` line per rank, ``utils.errors``) still exits
2. ``MSFC_DEBUG=1`` makes the processes print tracebacks for user errors too.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

# Exit code of a failed process whose code is unknown (torch reports none above 0, or a signal we cannot name).
_GENERIC_FAILURE = 1


def exit_code(failure: ProcessFailure) -> int:
    """The shell's exit code for a failed process: its own, or 128 + N for a process killed by signal N."""
    if failure.exitcode > 0:
        return failure.exitcode
    if failure.exitcode < 0:
        return 128 - failure.exitcode
    return _GENERIC_FAILURE


def describe(failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    return f"exit code {failure.exitcode}"


def summary(err: ChildFailedError) -> str:
    """One line: which module failed, on which ranks, how (their messages were printed above it)."""
    ranks = ", ".join(f"rank {rank} {describe(failure)}" for rank, failure in sorted(err.failures.items()))
    return f"launch: {err.name} failed ({ranks}); the processes' messages are above"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as err:
        print(summary(err), file=sys.stderr, flush=True)
        return exit_code(err.get_first_failure()[1])
    except SignalException as err:  # the launcher itself was told to stop; the agent has stopped the processes
        print(f"launch: stopped by {signal.Signals(err.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
