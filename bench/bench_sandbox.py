"""Sandbox benchmark: the adversarial set, each attack's ending and whether the host saw any effect, and
the cost of the boundary (a trivial program in the sandbox vs the same interpreter started plainly).

Each attack is a program run by `slmkit.agents.sandbox.run_python` under the default limits (the
python tool's), except where a smaller limit keeps the run short; the check after it looks from
outside: files it tried to create or delete, the listener it tried to reach, processes left behind,
secrets in what it printed.

    .venv/bin/python bench/bench_sandbox.py [--repeats 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from slmkit.agents.sandbox import Limits, check_isolation, run_python


def left_behind(marker: str) -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            count += marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            pass
    return count


def attacks(scratch: Path, port: int, secret: str) -> list[tuple[str, str, Limits, callable]]:
    keep = scratch / "keep.txt"
    outside = scratch / "outside.txt"
    pwned = scratch / "pwned"
    return [
        ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
         Limits(timeout_s=3), None),
        ("infinite loop", "while True:\n    pass\n", Limits(timeout_s=3), None),
        ("memory bomb", "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n", Limits(), None),
        ("1 GB of output", "import sys\nc = 'x' * 2 ** 20\nfor _ in range(1024):\n    sys.stdout.write(c)\n", Limits(), None),
        ("ctypes system()", f"import ctypes\nctypes.CDLL(None).system(b'touch {pwned}; kill -9 -1')\n", Limits(),
         lambda r: not pwned.exists()),
        ("read os.environ secrets", "import os\nprint(dict(os.environ))\nprint(open('/proc/1/environ','rb').read())\n"
         f"print(open('/proc/{os.getpid()}/environ','rb').read() if os.path.exists('/proc/{os.getpid()}/environ') else '')\n",
         Limits(), lambda r: secret not in r.stdout + r.stderr),
        ("connect to a 127.0.0.1 listener", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
         Limits(), None),
        ("write outside the work dir", f"open({str(outside)!r}, 'w').write('x')\n", Limits(), lambda r: not outside.exists()),
        ("delete host files", f"import os, shutil\ntry:\n    os.remove({str(keep)!r})\nexcept OSError as e:\n    print(e)\n"
         f"shutil.rmtree({str(scratch)!r})\n", Limits(), lambda r: keep.exists()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="trivial runs timed, each way (default: 20)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    isolation = check_isolation()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as listener:
        scratch = Path(tmp)
        (scratch / "keep.txt").write_text("keep")
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.settimeout(0.5)
        secret = f"s3cret-{uuid.uuid4().hex}"
        os.environ["BENCH_SECRET"] = secret
        for name, code, limits, check in attacks(scratch, listener.getsockname()[1], secret):
            filename = f"attack_{uuid.uuid4().hex}.py"
            result = run_python(code, limits, filename=filename)
            time.sleep(0.2)
            contained = left_behind(filename) == 0 and (check is None or check(result))
            if "listener" in name:
                try:
                    listener.accept()
                    contained = False
                except socket.timeout:
                    pass
            last = (result.stderr.strip().splitlines() or [""])[-1][:70]
            rows.append({"attack": name, "ended": result.describe(), "stderr": last, "contained": contained})

    def timed(cmd) -> float:
        start = time.perf_counter()
        cmd()
        return time.perf_counter() - start

    plain = [timed(lambda: subprocess.run([sys.executable, "-s", "-c", "pass"], check=True)) for _ in range(args.repeats)]
    boxed = [timed(lambda: run_python("pass")) for _ in range(args.repeats)]
    cost = {"plain_ms": 1000 * statistics.median(plain), "sandbox_ms": 1000 * statistics.median(boxed)}
    if args.json:
        print(json.dumps({"isolation": isolation, "attacks": rows, "startup": cost}, indent=2))
        return
    print(f"isolation: {isolation}\n")
    print("| attack | how it ended | last stderr line | contained |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['attack']} | {r['ended']} | `{r['stderr']}` | {'yes' if r['contained'] else '**NO**'} |")
    print(f"\nstartup, median of {args.repeats}: `python -c pass` {cost['plain_ms']:.0f} ms, in the sandbox "
          f"{cost['sandbox_ms']:.0f} ms ({cost['sandbox_ms'] / cost['plain_ms']:.2f}x)")


if __name__ == "__main__":
    main()
