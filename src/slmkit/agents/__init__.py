"""Agents: a tool-using loop over any OpenAI-compatible endpoint, its built-in tools, and the sandbox
that model-written code runs in."""

from slmkit.agents.agent import DEFAULT_SYSTEM_PROMPT, Agent, AgentRun, ModelError
from slmkit.agents.protocol import NativeProtocol, TextProtocol, ToolCall
from slmkit.agents.sandbox import Limits, SandboxResult, SandboxUnavailableError, run_file, run_python
from slmkit.agents.toolbox import (builtin_tools, calculator_tool, http_fetch_tool, python_tool, read_file_tool,
                                   search_docs_tool)
from slmkit.agents.tools import Tool, ToolFailure, tool

__all__ = ["Agent", "AgentRun", "ModelError", "DEFAULT_SYSTEM_PROMPT", "Tool", "ToolFailure", "ToolCall", "tool",
           "NativeProtocol", "TextProtocol", "builtin_tools", "calculator_tool", "python_tool", "read_file_tool",
           "http_fetch_tool", "search_docs_tool", "Limits", "SandboxResult", "SandboxUnavailableError", "run_python",
           "run_file"]
