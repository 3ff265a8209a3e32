"""What train.py and eval.py share as command-line programs: exit codes, error sentences, device
and dtype resolution, the MINILORA_DEBUG switch, and the progress display.

Exit codes (both programs):
  0  done
  1  the run itself failed: train.py's loss became NaN/inf, or an eval.py gate was missed
  2  a user error (a flag, a data file, a run folder, a damaged adapter or checkpoint) or a write the
     machine refuses (a full disk, a read-only folder): one sentence on stderr, nothing written (or,
     mid-run, nothing lost: the previous checkpoint stays whole)
  3  interrupted (SIGINT/SIGTERM, or Ctrl-C): nothing written is lost. In train.py's loop the step
     finished and a checkpoint was written; before or after the loop the run has its last checkpoint
     (or none). Either way `train.py --out RUN --resume` continues it; `train.py && eval.py` stops here
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3

EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 the run failed (loss became NaN/inf, or an eval gate was missed); "
    "2 a user error (flag, data file or run folder; one sentence on stderr); "
    f"{EXIT_INTERRUPTED} interrupted by SIGINT/SIGTERM or Ctrl-C (nothing lost; continue with --resume)."
)


class UsageError(ValueError):
    """A flag value that cannot work; the message is one sentence naming the flag and the fix."""


def fail(msg: str, code: int = EXIT_USAGE) -> int:
    """Print `error: msg` on stderr and return the exit code (2: a user error)."""
    print(f"error: {msg}", file=sys.stderr)
    return code


# What the machine, not the program, refuses: a full disk or quota, a read-only filesystem, no permission.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_main(
    body: Callable[[], int],
    errors: tuple[type[BaseException], ...] = (),
    again: str = "run again",
    interrupted: str | Callable[[], str] = "nothing was written; run the same command again",
) -> int:
    """Run a CLI's body; a user error (ValueError, a missing or existing file, and `errors`) ends in
    one sentence and exit 2 instead of a traceback, as does a write the machine refuses (a full disk,
    a read-only folder, no permission), whose sentence ends "free space or fix the permissions, then
    `again`". Ctrl-C (KeyboardInterrupt) ends in "interrupted; `interrupted`." (a sentence, or a
    function that says it) and exit 3: every file the programs write is written whole and then renamed,
    so a stop between two writes loses nothing. SIGTERM (`timeout`, `docker stop`, a batch scheduler)
    is Ctrl-C here, so every `finally` runs and removes the temporary files of a write in progress.
    MINILORA_DEBUG=1 shows the traceback instead."""
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        return body()
    except KeyboardInterrupt:
        if os.environ.get("MINILORA_DEBUG"):
            raise
        what = interrupted() if callable(interrupted) else interrupted
        return fail(f"interrupted; {what}.", code=EXIT_INTERRUPTED)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, *errors) as e:
        if os.environ.get("MINILORA_DEBUG"):
            raise
        return fail(str(e))
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS or os.environ.get("MINILORA_DEBUG"):
            raise
        where = f" {e.filename}" if e.filename else ""
        return fail(f"could not access{where} ({e.strerror}); free disk space or fix the permissions, then {again}.")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser that shows defaults and accepts no abbreviations: `--epoch 7` is an error,
    not a silent `--epochs 7` (or worse, a flag a preset then overrides)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """auto -> cuda when torch sees a GPU, else cpu; cpu; cuda; cuda:N. Anything else, or a CUDA
    device this torch cannot use, is a UsageError."""
    if not _DEVICE.match(name):
        raise UsageError(f"{flag} {name} is not a device; pass auto, cpu, cuda or cuda:N.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"{flag} {name} needs a CUDA GPU but {why}; pass {flag} cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"{flag} {name}: only {torch.cuda.device_count()} GPU(s) are visible; "
                f"pass {flag} cuda:0 .. cuda:{torch.cuda.device_count() - 1}."
            )
    return device


class Progress:
    """Progress through tqdm: a live bar on a terminal; elsewhere (a log file, a pipe) one plain
    line per update() call (the caller updates every --log-every steps)."""

    def __init__(self, total: int, enabled: bool = True, unit: str = "step", initial: int = 0):
        from tqdm.auto import tqdm

        self.total, self.enabled, self.unit = total, enabled, unit
        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True) if tty else None

    @property
    def live(self) -> bool:
        """Whether this is a bar redrawn in place (a terminal), so frequent updates cost no lines."""
        return self.bar is not None

    def update(self, n: int, text: str = "") -> None:
        """Progress is now n of total; `text` is shown beside it (loss | lr | tok/s | peak mem)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
        else:
            print(f"{self.unit} {n}/{self.total} {text}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
