"""The sandbox as a security boundary: the adversarial set (fork bomb, infinite loop, memory bomb, 1 GB of
output, ctypes system(), environment secrets, a loopback listener, writes outside the work directory,
deleting files), each contained and checked from outside; and it fails closed without bubblewrap.

Every attack targets only files and sockets this test creates, so a broken boundary fails the test
without harming the machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import slmkit
from slmkit.agents import sandbox
from slmkit.agents.sandbox import Limits, SandboxUnavailableError, run_python

FAST = Limits(timeout_s=5)


def processes_running(marker: str) -> list[int]:
    """Host processes whose command line holds `marker` (the sandboxed file's unique name)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_ordinary_code_runs_and_says_how_it_ended():
    r = run_python("import sys, os\nprint('hi', os.getcwd())\nprint('warn', file=sys.stderr)\nsys.exit(3)", FAST)
    assert (r.ended, r.exit_code, r.stdout, r.stderr) == ("exited", 3, "hi /sandbox\n", "warn\n")
    assert "bubblewrap" in r.isolation and r.describe().startswith("exited with code 3")
    ok = run_python("open('out.txt', 'w').write('x' * 100)\nprint(len(open('out.txt').read()))", FAST)
    assert ok.ok and ok.stdout == "100\n"  # its own folder is writable


# ---------------------------------------------------------------------------- the adversarial set
def test_fork_bomb_is_contained_and_leaves_no_process():
    name = f"forkbomb_{uuid.uuid4().hex}.py"
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    r = run_python(bomb, Limits(timeout_s=3), filename=name)
    assert r.ended == "timeout" and time.monotonic() - start < 10
    time.sleep(0.2)
    assert processes_running(name) == []
    # the host can still start processes
    assert subprocess.run(["true"]).returncode == 0


def test_process_count_is_capped():
    code = ("import os, time\nn = 0\nwhile n < 500:\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    n += 1\nprint(n)\n")
    r = run_python(code, Limits(timeout_s=10, max_processes=16))
    assert r.ok, r.stderr
    assert 0 < int(r.stdout) < 16


def test_infinite_loop_hits_the_wall_clock():
    start = time.monotonic()
    r = run_python("while True:\n    pass\n", Limits(timeout_s=2))
    assert r.ended == "timeout" and 2 <= time.monotonic() - start < 6
    assert r.describe().startswith("timed out: wall-clock limit of 2 s")


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    r = run_python("while True:\n    pass\n", Limits(timeout_s=20, cpu_s=1))
    assert r.ended == "cpu_limit" and r.signal == 24 and r.duration_s < 15


def test_memory_bomb_is_stopped_at_the_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n", Limits(timeout_s=20, memory_mb=256))
    assert r.ended == "memory_limit" and "MemoryError" in r.stderr
    assert r.describe().startswith("stopped: memory limit of 256 MB")


def test_a_gigabyte_of_output_is_cut_at_the_bound():
    code = "import sys\nchunk = 'x' * 2 ** 20\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n"
    start = time.monotonic()
    r = run_python(code, Limits(timeout_s=30, max_output_bytes=1 << 20))
    assert r.ended == "output_limit" and r.truncated
    assert len(r.stdout) == 1 << 20 and set(r.stdout) == {"x"}
    assert time.monotonic() - start < 10  # stopped at the bound, not after writing a gigabyte


def test_ctypes_system_runs_only_inside(tmp_path):
    target = tmp_path / "pwned"
    code = (f"import ctypes\nlibc = ctypes.CDLL(None)\n"
            f"print(libc.system(b'touch {target}; echo $? > /sandbox/status; kill -9 -1'))\n"
            f"print(open('/sandbox/status').read().strip())\n")
    r = run_python(code, FAST)
    assert not target.exists()
    assert r.ended in ("exited", "signal")  # `kill -9 -1` reaches only the sandbox's own processes
    assert os.getpid() and subprocess.run(["true"]).returncode == 0


def test_environment_secrets_do_not_reach_the_code(monkeypatch):
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SLMKIT_TEST_SECRET", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    code = (f"import os, json\nprint(json.dumps(dict(os.environ)))\n"
            f"for p in ['/proc/self/environ', '/proc/1/environ', '/proc/{os.getpid()}/environ', "
            f"'/proc/{os.getppid()}/environ']:\n"
            f"    try:\n        print(open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)\n")
    r = run_python(code, FAST)
    assert r.ok, r.stderr
    env = json.loads(r.stdout.splitlines()[0])
    assert secret not in r.stdout + r.stderr
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING",
                        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PWD", "LC_CTYPE"}


def test_a_loopback_listener_on_the_host_is_unreachable():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.settimeout(1.0)
        port = listener.getsockname()[1]
        code = (f"import socket\nfor host in ['127.0.0.1', 'localhost']:\n    try:\n"
                f"        socket.create_connection((host, {port}), timeout=2).sendall(b'leak')\n        print('connected')\n"
                f"    except OSError as e:\n        print(type(e).__name__)\n"
                f"try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    print('internet')\n"
                f"except OSError as e:\n    print(type(e).__name__)\n")
        r = run_python(code, FAST)
        with pytest.raises(socket.timeout):
            listener.accept()
    assert r.ok, r.stderr
    assert "connected" not in r.stdout and "internet" not in r.stdout
    assert r.stdout.splitlines()[0] == "ConnectionRefusedError"


def test_writing_outside_the_work_directory_fails(tmp_path):
    targets = [tmp_path / "outside.txt", Path(sys.prefix) / f"planted-{uuid.uuid4().hex}", Path("/tmp") / f"planted-{uuid.uuid4().hex}"]
    code = "import sys\nfor p in sys.argv[1:] or %r:\n" % [str(t) for t in targets + [Path("/usr/planted"), Path("/planted")]] + \
           "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError as e:\n        print('refused', p, e.strerror)\n"
    r = run_python(code, FAST)
    assert r.ok, r.stderr
    assert "wrote" not in r.stdout and r.stdout.count("refused") == 5
    assert not any(t.exists() for t in targets) and not Path("/usr/planted").exists() and not Path("/planted").exists()


def test_deleting_host_files_fails(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("important")
    code = (f"import os, shutil\nfor attempt in [lambda: os.remove({str(keep)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),\n"
            f"                lambda: os.remove({sys.executable!r})]:\n"
            f"    try:\n        attempt()\n        print('deleted')\n    except OSError as e:\n        print('refused', e.strerror)\n"
            f"os.remove(__file__)\nprint('own file removed')\n")
    r = run_python(code, FAST)
    assert r.ok, r.stderr
    assert "deleted" not in r.stdout and r.stdout.count("refused") == 3 and "own file removed" in r.stdout
    assert keep.read_text() == "important" and Path(sys.executable).exists()


# ---------------------------------------------------------------------------- failing closed, the CLI
def test_without_bubblewrap_nothing_runs(monkeypatch):
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: None if name == "bwrap" else real_which(name, path=path))
    with pytest.raises(SandboxUnavailableError, match="bwrap not found; install bubblewrap"):
        run_python("print('must not run')")
    from slmkit.agents import python_tool
    with pytest.raises(SandboxUnavailableError):
        python_tool()


def test_limits_are_checked():
    with pytest.raises(slmkit.SlmkitError, match="timeout_s must be positive"):
        Limits(timeout_s=0)
    with pytest.raises(slmkit.SlmkitError, match="memory_mb must be at least 64"):
        Limits(memory_mb=10)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(slmkit.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "slmkit", "sandbox", "run", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_runs_a_file_and_says_how_it_ended(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("print('hello from', __file__)\n")
    r = cli(str(good))
    assert r.returncode == 0 and r.stdout == "hello from /sandbox/good.py\n"
    assert r.stderr.startswith("sandbox: exited with code 0")
    loop = tmp_path / "loop.py"
    loop.write_text("while True:\n    pass\n")
    r = cli(str(loop), "--timeout", "1")
    assert r.returncode == 1 and "sandbox: timed out: wall-clock limit of 1 s" in r.stderr
    bomb = tmp_path / "bomb.py"
    bomb.write_text("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))\n")
    r = cli(str(bomb), "--memory-mb", "128", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ended"] == "memory_limit"
    r = cli(str(tmp_path / "missing.py"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'missing.py'} does not exist"
