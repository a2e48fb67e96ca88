"""The built-in tools: calculator, python (the sandbox), read_file (inside one folder), http_fetch
(off unless hosts are allowed) and search_docs (over any retriever callable)."""

from __future__ import annotations

import difflib
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from slmkit.agents import calculator as calc
from slmkit.agents.sandbox import Limits, check_isolation, run_python
from slmkit.agents.tools import Tool, tool
from slmkit.errors import InputError, MissingExtraError

BUILTIN = ("calculator", "python", "read_file", "http_fetch", "search_docs")


def calculator_tool() -> Tool:
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly, e.g. "(17 * 23) + 2**10" or "sqrt(2) * pi".

        Args:
            expression: numbers, + - * / // % ** and parentheses, constants pi, e, tau, and functions such as
                sqrt, log, exp, sin, cos, floor, ceil, round, min, max, factorial.
        """
        return calc.format_number(calc.evaluate(expression))
    return tool(calculator, timeout_s=10)


def python_tool(limits: Limits | None = None, requires_approval: bool = False) -> Tool:
    """Runs model-written code in the sandbox (slmkit.agents.sandbox) under `limits`; fails closed
    here, before any run, when the sandbox is unavailable."""
    limits = limits or Limits()
    check_isolation()

    def python(code: str) -> str:
        """Run a Python program in a sandbox (no network, no files outside its own folder) and return what it
        printed. Print the values you need.

        Args:
            code: the complete program.
        """
        result = run_python(code, limits)
        parts = [result.stdout.rstrip("\n")] if result.stdout else []
        if result.stderr:
            parts.append("stderr:\n" + result.stderr.rstrip("\n")[-4000:])
        if not result.ok or not parts:
            parts.append(f"({result.describe()})")
        return "\n".join(parts)
    return tool(python, requires_approval=requires_approval, timeout_s=limits.timeout_s + 15)


def read_file_tool(root: str | os.PathLike, max_bytes: int = 64_000) -> Tool:
    """Reads text files under `root` only: `..`, absolute paths and symbolic links that lead outside are
    refused, and the opened file itself is checked to lie inside (no race with a swapped link)."""
    try:
        base = Path(root).resolve(strict=True)
    except OSError:
        raise InputError(f"read_file root {root} does not exist") from None
    if not base.is_dir():
        raise InputError(f"read_file root {root} is not a folder")

    def read_file(path: str) -> str:
        """Read a text file from the allowed folder.

        Args:
            path: the file's path relative to that folder, e.g. "notes/todo.txt".
        """
        target = (base / path).resolve()
        if not target.is_relative_to(base):
            raise PermissionError(f"{path} is outside the allowed folder")
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} does not exist") from None
        try:
            if not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(base):  # what was opened, not what was checked
                raise PermissionError(f"{path} is outside the allowed folder")
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(f"{path} is not a regular file")
            data = os.read(fd, max_bytes + 1)
        finally:
            os.close(fd)
        text = data[:max_bytes].decode("utf-8", "replace")
        return text + (f"\n[truncated at {max_bytes} bytes]" if len(data) > max_bytes else "")
    return tool(read_file, timeout_s=10)


def http_fetch_tool(allowed_hosts: Sequence[str], max_bytes: int = 64_000, timeout_s: float = 10.0) -> Tool:
    """GET pages from `allowed_hosts` only ("*" allows any host); every redirect is checked too.
    There is no default: fetching is off until hosts are named."""
    hosts = {h.lower() for h in allowed_hosts}
    if not hosts:
        raise InputError("http_fetch is off by default: name the hosts it may fetch from (--allow-host HOST, '*' for any)")
    try:
        import httpx
    except ImportError:
        raise MissingExtraError("httpx", "agents") from None

    def http_fetch(url: str) -> str:
        """Fetch a web page or file over HTTP(S) and return its text.

        Args:
            url: the full address, e.g. "https://example.com/page".
        """
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            for _ in range(5):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https"):
                    raise ValueError(f"only http and https URLs can be fetched, not {parts.scheme or 'a bare path'!r}")
                if "*" not in hosts and (parts.hostname or "").lower() not in hosts:
                    raise PermissionError(f"host {parts.hostname!r} is not allowed; allowed: {', '.join(sorted(hosts))}")
                with client.stream("GET", url) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            break
                    text = bytes(body[:max_bytes]).decode(response.encoding or "utf-8", "replace")
                    more = "\n[truncated]" if len(body) > max_bytes else ""
                    return f"HTTP {response.status_code} {response.headers.get('content-type', '')}\n{text}{more}"
        raise ValueError("too many redirects")
    return tool(http_fetch, timeout_s=timeout_s * 6)


def search_docs_tool(retriever: Callable[[str, int], Sequence[Any]], k: int = 4) -> Tool:
    """Search over any retriever: `retriever(query, k)` returns passages, each a string or a dict
    with "text" (and optionally "source" / "score") or an object with those attributes."""
    def search_docs(query: str) -> str:
        """Search the documents for passages relevant to a question.

        Args:
            query: what to look for, in a few words.
        """
        hits = list(retriever(query, k))[:k]
        if not hits:
            return "no passages found"
        lines = []
        for i, hit in enumerate(hits, 1):
            text, source = _field(hit, "text"), _field(hit, "source")
            lines.append(f"[{i}]{f' ({source})' if source else ''} {text if text is not None else hit}")
        return "\n".join(lines)
    return tool(search_docs)


def builtin_tools(names: Sequence[str], *, root: str | os.PathLike | None = None, allowed_hosts: Sequence[str] = (),
                  retriever: Callable[[str, int], Sequence[Any]] | None = None, sandbox_limits: Limits | None = None,
                  requires_approval: Sequence[str] = ()) -> list[Tool]:
    """The built-in tools named in `names`, configured; unknown names are an error naming the closest."""
    for name in list(names) + list(requires_approval):
        if name not in BUILTIN:
            close = difflib.get_close_matches(name, BUILTIN, 1, 0.5)
            raise InputError(f"unknown tool {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                             f"built-in tools: {', '.join(BUILTIN)}")
    tools = []
    for name in dict.fromkeys(names):
        if name == "calculator":
            made = calculator_tool()
        elif name == "python":
            made = python_tool(sandbox_limits)
        elif name == "read_file":
            made = read_file_tool(root if root is not None else os.getcwd())
        elif name == "http_fetch":
            made = http_fetch_tool(allowed_hosts)
        else:
            if retriever is None:
                raise InputError("search_docs needs a retriever: a callable (query, k) -> passages "
                                 "(on the command line, --retriever MODULE:FUNCTION)")
            made = search_docs_tool(retriever)
        made.requires_approval = made.requires_approval or name in requires_approval
        tools.append(made)
    return tools


def _field(hit: Any, name: str) -> Any:
    if isinstance(hit, str):
        return hit if name == "text" else None
    if isinstance(hit, dict):
        return hit.get(name)
    return getattr(hit, name, None)
