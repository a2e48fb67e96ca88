"""Run untrusted Python (code a model wrote) behind a boundary: bubblewrap namespaces plus rlimits.

Every run gets its own process tree in new PID, network, IPC and UTS namespaces (`bwrap`, Debian's
`bubblewrap` package). Its file system is a fresh size-capped tmpfs at /sandbox (the working
directory) plus read-only binds of /usr and this Python's installation; nothing else of the host
is visible, and the root is read-only. The environment is scrubbed to a handful of variables. The
network namespace holds only its own loopback, so 127.0.0.1 reaches nothing on the host. rlimits
(set by util-linux `prlimit` before `bwrap` starts) cap CPU seconds, address space, processes, file
size, open files and core dumps; the parent enforces the wall-clock limit and bounds the output it
keeps, killing the whole tree when either is hit.

Process limits only bind a non-root user, so when slmkit runs as root the code runs as a fresh
unprivileged uid (`setpriv` inside the sandbox, with every capability dropped and no_new_privs);
as a normal user, bwrap maps the user into a new user namespace and the process limit counts on
top of the user's existing processes. When bwrap, prlimit or (as root) setpriv is missing, or the
kernel refuses the namespaces, `run_python` raises `SandboxUnavailableError`: no code runs without
the boundary.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slmkit.errors import InputError, SlmkitError

WORK_DIR = "/sandbox"
ENDINGS = ("exited", "timeout", "cpu_limit", "memory_limit", "output_limit", "signal")
_UID_BASE = 1_900_000_000  # root runs: each sandbox gets its own unprivileged uid from here (no /etc/passwd entry)
_uids = itertools.count()
_probe_lock = threading.Lock()
_probed: dict[tuple, str] = {}


class SandboxUnavailableError(SlmkitError):
    """No isolation this module trusts is available on this machine; nothing was run."""


@dataclass(frozen=True)
class Limits:
    """What one run may use. `cpu_s` defaults to the wall-clock timeout rounded up."""

    timeout_s: float = 10.0
    memory_mb: int = 512          # address space of each process (RLIMIT_AS)
    cpu_s: int | None = None      # CPU seconds of each process (RLIMIT_CPU)
    max_processes: int = 32       # processes and threads (RLIMIT_NPROC)
    max_file_mb: int = 16         # largest file it may write (RLIMIT_FSIZE)
    work_dir_mb: int = 64         # size of the tmpfs working directory
    max_output_bytes: int = 1 << 20  # stdout + stderr kept; more stops the run

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not value > 0:
                raise InputError(f"sandbox limit {name} must be positive, not {value}")
        if self.memory_mb < 64:
            raise InputError(f"sandbox memory_mb must be at least 64 (Python itself needs ~30 MB), not {self.memory_mb}")

    @property
    def cpu_seconds(self) -> int:
        return self.cpu_s or max(1, math.ceil(self.timeout_s))


@dataclass(frozen=True)
class SandboxResult:
    """How a run ended. `ended` is one of ENDINGS; `exit_code` is set when it exited, `signal` when
    a signal ended it (exit statuses above 128 are read as signals, as shells do)."""

    ended: str
    exit_code: int | None
    signal: int | None
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool
    limits: Limits
    isolation: str

    @property
    def ok(self) -> bool:
        return self.ended == "exited" and self.exit_code == 0

    def describe(self) -> str:
        lim = self.limits
        return {
            "exited": f"exited with code {self.exit_code}",
            "timeout": f"timed out: wall-clock limit of {lim.timeout_s:g} s",
            "cpu_limit": f"stopped: CPU time limit of {lim.cpu_seconds} s",
            "memory_limit": f"stopped: memory limit of {lim.memory_mb} MB (MemoryError)",
            "output_limit": f"stopped: output over the limit of {lim.max_output_bytes:,} bytes",
            "signal": f"killed by signal {self.signal} ({_signal_name(self.signal)})",
        }[self.ended] + f" after {self.duration_s:.2f} s"

    def to_dict(self) -> dict:
        return {**asdict(self), "limits": asdict(self.limits), "description": self.describe()}


def run_python(code: str, limits: Limits | None = None, *, filename: str = "main.py") -> SandboxResult:
    """Run `code` as /sandbox/`filename` with this interpreter, inside the sandbox, under `limits`."""
    limits = limits or Limits()
    if "/" in filename or filename in ("", ".", ".."):
        raise InputError(f"sandbox file name must be a plain name, not {filename!r}")
    isolation = check_isolation()
    fd = os.memfd_create("sandbox-code")
    try:
        os.write(fd, code.encode("utf-8", "surrogateescape"))
        os.lseek(fd, 0, os.SEEK_SET)
        return _run(limits, fd, filename, isolation)
    finally:
        os.close(fd)


def run_file(path: str | os.PathLike, limits: Limits | None = None) -> SandboxResult:
    """`run_python` on the text of a file (it keeps its name inside /sandbox)."""
    path = Path(path)
    try:
        code = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {(e.strerror or str(e)).lower()}") from None
    return run_python(code, limits, filename=path.name)


def check_isolation() -> str:
    """Describe the isolation runs get, after checking once that it works; raise
    SandboxUnavailableError (fail closed) when it does not."""
    tools = _tools()
    key = (os.geteuid(), tuple(tools.values()))
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(tools)
    return _probed[key]


def _tools() -> dict[str, str | None]:
    """Where bwrap, prlimit and setpriv are (system folders only, never a PATH the caller set)."""
    return {name: shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin") for name in ("bwrap", "prlimit", "setpriv")}


def _probe(tools: dict[str, str | None]) -> str:
    needed = ("bwrap", "prlimit", "setpriv") if os.geteuid() == 0 else ("bwrap", "prlimit")
    missing = [name for name in needed if tools[name] is None]
    if missing:
        package = {"bwrap": "bubblewrap", "prlimit": "util-linux", "setpriv": "util-linux"}
        raise SandboxUnavailableError(
            f"no sandbox isolation available: {', '.join(missing)} not found; install "
            f"{' and '.join(sorted({package[m] for m in missing}))} (Debian/Ubuntu: apt-get install "
            f"{' '.join(sorted({package[m] for m in missing}))}). Model-written code never runs unsandboxed")
    fd = os.memfd_create("sandbox-probe")
    try:
        os.write(fd, b"print('ok')")
        os.lseek(fd, 0, os.SEEK_SET)
        limits = Limits(timeout_s=30)
        result = _run(limits, fd, "probe.py", "probe")
    finally:
        os.close(fd)
    if not result.ok or result.stdout.strip() != "ok":
        detail = (result.stderr.strip().splitlines() or [result.describe()])[-1]
        raise SandboxUnavailableError(f"no sandbox isolation available: bubblewrap cannot set up its namespaces here "
                                      f"({detail}); unprivileged user namespaces may be disabled on this kernel")
    version = subprocess.run([tools["bwrap"], "--version"], capture_output=True, text=True).stdout.strip()
    who = "a fresh unprivileged uid" if os.geteuid() == 0 else "a new user namespace"
    return (f"{version or 'bubblewrap'}: new pid/net/ipc/uts namespaces, read-only system files, tmpfs {WORK_DIR}, "
            f"{who}, rlimits")


def _command(limits: Limits, code_fd: int, info_fd: int, filename: str) -> list[str]:
    """prlimit ... -- bwrap ... [setpriv ...] python -s /sandbox/FILENAME (the environment is bwrap's
    --setenv list alone, so Python reads its PYTHON* settings from there)."""
    tools, mb = _tools(), 1 << 20
    nproc = limits.max_processes if os.geteuid() == 0 else _tasks_of_this_user() + limits.max_processes
    cmd = [tools["prlimit"], f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}", f"--as={limits.memory_mb * mb}",
           f"--nproc={nproc}", f"--fsize={limits.max_file_mb * mb}", "--nofile=256", "--core=0", "--",
           tools["bwrap"], "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session", "--hostname", "sandbox", "--info-fd", str(info_fd)]
    if os.geteuid() == 0:  # bwrap needs no user namespace; setpriv below uses these two, then drops everything
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    cmd += _filesystem()
    cmd += ["--perms", "0777", "--size", str(limits.work_dir_mb * mb), "--tmpfs", WORK_DIR,
            "--perms", "0644", "--file", str(code_fd), f"{WORK_DIR}/{filename}",
            "--remount-ro", "/", "--chdir", WORK_DIR, "--clearenv"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORK_DIR, "TMPDIR": WORK_DIR, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, value in env.items():
        cmd += ["--setenv", name, value]
    if os.geteuid() == 0:
        uid = _UID_BASE + (os.getpid() % 100_000) * 1000 + next(_uids) % 1000
        cmd += [tools["setpriv"], f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--inh-caps=-all", "--bounding-set=-all", "--"]
    return cmd + [sys.executable, "-s", f"{WORK_DIR}/{filename}"]


def _filesystem() -> list[str]:
    """Read-only binds of what the interpreter needs: /usr, the top-level links or folders into it,
    and this Python's own prefixes, each at its own path (with world-readable parents)."""
    args: list[str] = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    binds = ["/usr"]
    for prefix in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))):
        prefix = os.path.realpath(prefix)
        if not any(prefix == b or prefix.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(prefix)
    made: set[str] = set()
    for bind in binds:
        parts = bind.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", bind, bind]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args + ["--proc", "/proc", "--dev", "/dev"]


def _tasks_of_this_user() -> int:
    """Processes and threads of this real uid: RLIMIT_NPROC counts them together with the sandbox's."""
    uid, total = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _run(limits: Limits, code_fd: int, filename: str, isolation: str) -> SandboxResult:
    # 1) start the tree in its own session; bwrap reports the pid of the namespace's init on info_w
    info_r, info_w = os.pipe()
    start = time.monotonic()
    deadline = start + limits.timeout_s
    try:
        proc = subprocess.Popen(_command(limits, code_fd, info_w, filename), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(code_fd, info_w), env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
    finally:
        os.close(info_w)
    try:
        # 2) read the pipes until they close, the wall clock runs out, or the output passes its bound
        out, err, info, stopped = _collect(proc, info_r, limits, deadline)
        # 3) the process may outlive its pipes; kill the tree when a limit stopped it or time is up
        if stopped is None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stopped = "timeout"
        if stopped is not None:
            _kill(proc, info)
    finally:
        os.close(info_r)
        proc.stdout.close()
        proc.stderr.close()
    duration = time.monotonic() - start
    # 4) name how it ended
    code = proc.returncode
    stderr = err.decode("utf-8", "replace")
    exit_code = sig = None
    if stopped is not None:
        ended = stopped
    elif code > 128 or code < 0:
        sig = code - 128 if code > 128 else -code
        ended = "cpu_limit" if sig == signal.SIGXCPU else "signal"
    else:
        exit_code = code
        last = stderr.strip().splitlines()[-1:] or [""]
        ended = "memory_limit" if code != 0 and last[0].startswith("MemoryError") else "exited"
    return SandboxResult(ended, exit_code, sig, out.decode("utf-8", "replace"), stderr, round(duration, 3),
                         stopped == "output_limit", limits, isolation)


def _collect(proc: subprocess.Popen, info_fd: int, limits: Limits,
             deadline: float) -> tuple[bytes, bytes, bytes, str | None]:
    """stdout and stderr (keeping at most limits.max_output_bytes in all), bwrap's info JSON, and the
    reason reading stopped early ("timeout", "output_limit"), or None when the pipes closed."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray(), info_fd: bytearray()}
    selector = selectors.DefaultSelector()
    for fd in buffers:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    seen, stopped = 0, None
    try:
        while selector.get_map() and stopped is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "timeout"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.fd == info_fd:
                    buffers[info_fd] += chunk
                else:
                    buffers[key.fd] += chunk[: max(0, limits.max_output_bytes - seen)]
                    seen += len(chunk)
                    if seen > limits.max_output_bytes:
                        stopped = "output_limit"
                        break
    finally:
        selector.close()
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), bytes(buffers[info_fd]), stopped


def _kill(proc: subprocess.Popen, info: bytes) -> None:
    """SIGKILL the namespace's init: the kernel then kills every process in the namespace before
    bwrap sees it exit, so nothing outlives the run (and bwrap reaps it: no zombie is left behind).
    bwrap's own session is killed only when it does not follow within seconds."""
    try:
        child = int(json.loads(info.decode() or "{}").get("child-pid", 0))
    except (ValueError, AttributeError):
        child = 0
    if child > 0 and proc.poll() is None:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number).name
    except (ValueError, TypeError):
        return "unknown"
