"""`slmkit sandbox run`: run a Python file under the agents' sandbox, to see the boundary for yourself."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_run(args: argparse.Namespace) -> None:
    from slmkit.agents.sandbox import Limits, run_file

    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb, max_processes=args.max_processes)
    result = run_file(args.file, limits)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        if (result.stdout and not result.stdout.endswith("\n")) or (result.stderr and not result.stderr.endswith("\n")):
            print(file=sys.stderr)
        print(f"sandbox: {result.describe()}{' (output truncated)' if result.truncated else ''} [{result.isolation}]",
              file=sys.stderr)
    if not result.ok:
        sys.exit(1)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from slmkit.agents.sandbox import Limits

    defaults = Limits()
    p = commands.add_parser("sandbox", help="run untrusted Python under the agents' sandbox",
                            description="The sandbox the python tool and code evaluation use: bubblewrap namespaces "
                                        "(no network, read-only system files, a fresh tmpfs working directory), a "
                                        "scrubbed environment and rlimits.")
    sub = p.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND", required=True)
    r = sub.add_parser("run", parents=[common], help="run FILE.py in the sandbox and say how it ended",
                       description="Run FILE.py in the sandbox under exactly the limits the python tool uses, print "
                                   "its stdout and stderr, then one line on stderr saying how it ended (exit code, "
                                   "timeout, CPU or memory limit, output limit, signal). Exit status 0 when the "
                                   "program exited with 0, else 1; 2 when the sandbox is unavailable.")
    r.add_argument("file", metavar="FILE.py", help="the Python file to run (copied into the sandbox's /sandbox)")
    r.add_argument("--timeout", type=float, default=defaults.timeout_s, metavar="S",
                   help=f"wall-clock limit in seconds; the CPU limit follows it (default: {defaults.timeout_s:g})")
    r.add_argument("--memory-mb", type=int, default=defaults.memory_mb, metavar="M",
                   help=f"address space per process in MB (default: {defaults.memory_mb})")
    r.add_argument("--max-processes", type=int, default=defaults.max_processes, metavar="N",
                   help=f"processes and threads (default: {defaults.max_processes})")
    r.add_argument("--json", action="store_true", help="print the result as JSON instead")
    r.set_defaults(handler=cmd_run)
