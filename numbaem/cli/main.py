"""Entry point of the ``numbaem`` command: parses arguments, sets up logging, turns errors into one line.

Every bad input ends in one sentence on standard error and a non-zero exit (2 for bad
input, 130 for an interrupted run, 1 for an unexpected failure); ``--debug`` shows the
traceback instead.
"""
import argparse
import logging
import sys

from ..runtime.errors import InterruptedRun, NumbaemError, OutputExists
from . import demo
from . import fsc
from . import molecule
from . import project
from . import reconstruct
from . import simulate

COMMANDS = {
    "simulate": simulate,
    "project": project,
    "molecule": molecule,
    "reconstruct": reconstruct,
    "fsc": fsc,
    "demo": demo,
}


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one sentence under the command's own name
    (``numbaem reconstruct: error: ...``), the fix named, no usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}; see '{self.prog} --help'\n")
        raise SystemExit(2)


def build_parser():
    parser = _Parser(prog="numbaem", description="Cryo-EM structure recovery directly from micrographs "
                     "by approximate expectation-maximization (no particle picking).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, mod in COMMANDS.items():
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0],
                           description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        g = p.add_argument_group("output and diagnostics")
        g.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
        g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
        g.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
        p.set_defaults(_module=mod)
    return parser


def _version():
    from .._version import __version__
    return __version__


def _setup_logging(args):
    level = logging.WARNING if args.quiet else (logging.INFO if args.verbose < 2 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if args.verbose >= 2
                                           else "%(message)s"))
    root = logging.getLogger("numbaem")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv=None):
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    root = logging.getLogger("numbaem")
    saved = (root.handlers[:], root.level, root.propagate)
    _setup_logging(args)
    try:
        return _run(args)
    finally:  # leave logging as found: the CLI may run in process (tests, notebooks)
        root.handlers[:], root.level, root.propagate = saved


def _run(args):
    try:
        status = args._module.main(args)
        return 0 if status is None else int(status)
    except (NumbaemError, InterruptedRun) as exc:
        if args.debug:
            raise
        text = exc.cli_message() if isinstance(exc, OutputExists) else str(exc)
        sys.stderr.write(f"numbaem {args.command}: error: {text}\n" if isinstance(exc, NumbaemError)
                         else f"numbaem {args.command}: {text}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"numbaem {args.command}: interrupted.\n")
        return 130
    except MemoryError:
        if args.debug:
            raise
        sys.stderr.write(f"numbaem {args.command}: error: out of memory; lower --memory or use a smaller problem.\n")
        return 1
    except OSError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"numbaem {args.command}: error: {exc.strerror or exc} "
                         f"({exc.filename or 'file'}); check the path and permissions.\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one sentence, no traceback
        if args.debug:
            raise
        sys.stderr.write(f"numbaem {args.command}: internal error ({type(exc).__name__}: {exc}); "
                         "please report it, with --debug output.\n")
        return 1


def entry():  # pragma: no cover
    raise SystemExit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
