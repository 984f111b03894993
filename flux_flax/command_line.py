"""What both command lines (`convrot-flux`, `convrot-convert`) share: exit statuses, one-line
errors, interrupts, reading users' text files, the version, and JAX's persistent compilation
cache. Nothing here imports jax at module level: arguments are checked before it loads."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from flux_flax import interrupts

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# What a run that ends by an error we expect (bad input, a damaged file, NaN output) raises;
# anything else is a bug and keeps its traceback.
FAILURES = (ValueError, OSError, RuntimeError)


class UsageError(ValueError):
    """An argument is invalid: reported with the usage line, exit status 2."""


def package_version() -> str:
    try:
        return version("convrot-jax")
    except PackageNotFoundError:
        return "unknown (not installed)"


def one_line(error: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span pages)."""
    return " ".join(str(error).split()) or type(error).__name__


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named; every error names the file (`UsageError`)."""
    path = Path(path).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def report_to_stderr(prog: str) -> None:
    """Shows the library's notices (logger "flux_flax", INFO and up) as `prog: message` lines."""
    logger = logging.getLogger("flux_flax")
    if not any(getattr(h, "convrot_prog", None) == prog for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
        handler.convrot_prog = prog
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def default_compilation_cache() -> Path:
    """`$XDG_CACHE_HOME/convrot-jax/jax-compilation` (~/.cache/... when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convrot-jax" / "jax-compilation"


def add_compilation_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile-cache", type=Path, default=default_compilation_cache(), metavar="DIR",
                       help="JAX's persistent compilation cache: a second run skips compiling (default: %(default)s)")
    group.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const=None,
                       help="do not read or write the compilation cache")


def enable_compilation_cache(path: Path | None) -> None:
    """Points JAX's persistent compilation cache at `path` (None: leaves it off)."""
    if path is None:
        return
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))


def run(prog: str, parser: argparse.ArgumentParser, args: argparse.Namespace, validate: Callable,
        execute: Callable, interrupted: str = "interrupted") -> int:
    """Validates parsed `args` into a request (usage errors: message and usage, exit 2), then
    executes it: an expected failure prints one line and exits 1, Ctrl-C exits 130 and SIGTERM
    143, each with one line saying `interrupted`."""
    try:
        request = validate(args)
    except (ValueError, OSError) as e:  # UsageError and the settings' own checks are ValueErrors
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with interrupts.raising():
            execute(request)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted} (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except interrupts.Terminated:
        print(f"{prog}: {interrupted} (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except FAILURES as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
