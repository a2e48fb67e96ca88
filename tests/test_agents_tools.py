"""The built-in tools: the calculator's AST evaluator, read_file's folder boundary, http_fetch's host
list, search_docs over a retriever, and the python tool in the sandbox."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from slmkit.agents import (ToolFailure, builtin_tools, calculator_tool, http_fetch_tool, python_tool, read_file_tool,
                           search_docs_tool)
from slmkit.agents.calculator import evaluate, format_number
from slmkit.agents.sandbox import Limits
from slmkit.errors import InputError


# ---------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("expression, expected", [
    ("17 * 23", "391"), ("(17*23) + 2^10", "1415"), ("2**-2", "0.25"), ("10 / 4", "2.5"), ("7 // 2", "3"),
    ("-3 % 5", "2"), ("sqrt(2) * pi", "4.44288293816"), ("factorial(20)", "2432902008176640000"),
    ("max(1, 5, 3) + min(2, 4)", "7"), ("round(2.675, 2)", "2.67"), ("log(e)", "1"), ("12 =", "12"),
    ("2 ** 100", str(2 ** 100)),
])
def test_calculator_evaluates(expression, expected):
    assert format_number(evaluate(expression)) == expected


@pytest.mark.parametrize("expression, fragment", [
    ("__import__('os').system('id')", "unknown function"),
    ("__import__('os')", "unknown function '__import__'"),
    ("().__class__.__bases__", "is not allowed"),
    ("open('/etc/passwd')", "unknown function 'open'"),
    ("x + 1", "unknown name 'x'"),
    ("'a' * 3", "is not allowed"),
    ("[i for i in range(10)]", "is not allowed"),
    ("1 / 0", "division by zero"),
    ("10 ** 10 ** 10", "result too large"),
    ("factorial(100000)", "result too large"),
    ("2.0 ** 1e6", "result too large"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"),
    ("", "empty expression"),
    ("1+" * 600 + "1", "longer than 1000"),
    ("sqrt(-1)", "math domain error"),
])
def test_calculator_refuses(expression, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("*", r"\*")):
        evaluate(expression)


def test_calculator_tool_reports_errors_as_tool_failures():
    calc = calculator_tool()
    assert calc.call({"expression": "6*7"}) == "42"
    with pytest.raises(ToolFailure, match="calculator raised ValueError: unknown name 'y'") as e:
        calc.call("y")
    assert e.value.kind == "error"


# ---------------------------------------------------------------------------- read_file
@pytest.fixture
def docs(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta")
    (tmp_path / "secret.txt").write_text("top secret")
    (root / "inside_link.txt").symlink_to(root / "a.txt")
    (root / "escape_link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "escape_dir").symlink_to(tmp_path)
    return root


def test_read_file_reads_inside_the_root(docs):
    read = read_file_tool(docs)
    assert read.call({"path": "a.txt"}) == "alpha"
    assert read.call({"path": "sub/b.txt"}) == "beta"
    assert read.call({"path": "sub/../a.txt"}) == "alpha"
    assert read.call({"path": "inside_link.txt"}) == "alpha"  # a link that stays inside is fine


@pytest.mark.parametrize("path", ["../secret.txt", "sub/../../secret.txt", "/etc/passwd", "escape_link.txt",
                                  "escape_dir/secret.txt"])
def test_read_file_refuses_every_way_out(docs, path):
    with pytest.raises(ToolFailure, match="is outside the allowed folder"):
        read_file_tool(docs).call({"path": path})


def test_read_file_errors_and_truncation(docs):
    read = read_file_tool(docs, max_bytes=3)
    assert read.call({"path": "a.txt"}) == "alp\n[truncated at 3 bytes]"
    with pytest.raises(ToolFailure, match="missing.txt does not exist"):
        read.call({"path": "missing.txt"})
    with pytest.raises(ToolFailure, match="sub is not a regular file"):
        read.call({"path": "sub"})
    with pytest.raises(InputError, match="does not exist"):
        read_file_tool(docs / "nope")


# ---------------------------------------------------------------------------- http_fetch
@pytest.fixture(scope="module")
def web():
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://localhost:%d/page" % self.server.server_address[1])
                self.end_headers()
                return
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", "/page")
                self.end_headers()
                return
            body = b"hello web" if self.path == "/page" else b"x" * 10_000
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_fetch_is_off_by_default():
    with pytest.raises(InputError, match="http_fetch is off by default"):
        http_fetch_tool([])
    with pytest.raises(InputError, match="http_fetch is off by default"):
        builtin_tools(["http_fetch"])


def test_http_fetch_fetches_from_allowed_hosts_only(web):
    fetch = http_fetch_tool(["127.0.0.1"], max_bytes=100)
    assert fetch.call({"url": web + "/page"}) == "HTTP 200 text/plain\nhello web"
    assert fetch.call({"url": web + "/hop"}).endswith("hello web")  # a redirect on the same host
    assert fetch.call({"url": web + "/big"}).endswith("\n[truncated]")
    with pytest.raises(ToolFailure, match="host 'localhost' is not allowed"):
        fetch.call({"url": web + "/away"})  # a redirect to another host is checked too
    with pytest.raises(ToolFailure, match="only http and https"):
        fetch.call({"url": "file:///etc/passwd"})
    assert http_fetch_tool(["*"]).call({"url": web.replace("127.0.0.1", "localhost") + "/page"}).endswith("hello web")


# ---------------------------------------------------------------------------- search_docs, python, the registry
def test_search_docs_formats_what_the_retriever_returns():
    seen = []

    def retriever(query, k):
        seen.append((query, k))
        return [{"text": "Paris is the capital of France.", "source": "geo.md", "score": 0.9}, "plain passage"]

    search = search_docs_tool(retriever, k=2)
    assert search.call({"query": "capital of France"}) == "[1] (geo.md) Paris is the capital of France.\n[2] plain passage"
    assert seen == [("capital of France", 2)]
    assert search_docs_tool(lambda q, k: []).call("x") == "no passages found"


def test_python_tool_runs_in_the_sandbox(monkeypatch):
    monkeypatch.setenv("SLMKIT_TEST_SECRET", "hunter2")
    py = python_tool(Limits(timeout_s=5))
    assert py.call({"code": "print(sum(range(101)))"}) == "5050"
    out = py.call({"code": "import os\nprint(os.environ.get('SLMKIT_TEST_SECRET'))\nraise SystemExit(4)"})
    assert out == "None\n(exited with code 4 after " + out.split("after ")[1]
    assert "ZeroDivisionError" in py.call({"code": "1/0"})


def test_builtin_tools_by_name(tmp_path, monkeypatch):
    tools = builtin_tools(["calculator", "read_file", "search_docs"], root=tmp_path, retriever=lambda q, k: [],
                          requires_approval=["read_file"])
    assert [t.name for t in tools] == ["calculator", "read_file", "search_docs"]
    assert [t.requires_approval for t in tools] == [False, True, False]
    with pytest.raises(InputError, match=r"unknown tool 'calc' \(did you mean 'calculator'\?\)"):
        builtin_tools(["calc"])
    monkeypatch.chdir(tmp_path)  # read_file defaults to the current directory
    (tmp_path / "here.txt").write_text("here")
    assert builtin_tools(["read_file"])[0].call({"path": "here.txt"}) == "here"
