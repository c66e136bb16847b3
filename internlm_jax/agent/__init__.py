"""Agents and tools (Lagent / AgentLego in one package): action API, sandboxed interpreter, tool library,
InternLM2 and OpenAI tool protocols, ReAct / ReWOO / InternLM2 agents, a tool server and a tool-use benchmark."""
from internlm_jax.agent.actions import (ARGS_ERROR, SUCCESS, TOOL_ERROR, ActionExecutor, ActionResult, Tool,
                                        Toolkit, function_schema, make_tool, tool_api)
from internlm_jax.agent.base import AgentResult, BaseAgent, Memory, Step, StopAgent
from internlm_jax.agent.internlm2_agent import InternLM2Agent
from internlm_jax.agent.interpreter import CellResult, InterpreterTool, PythonSession
from internlm_jax.agent.llm import LLM, InProcessLLM, LLMError, OpenAIClient, Reply, ScriptedLLM
from internlm_jax.agent.protocols import NativeProtocol, OpenAIProtocol
from internlm_jax.agent.react import ReActAgent
from internlm_jax.agent.rewoo import ReWOOAgent
from internlm_jax.agent.tool_server import ToolServer, remote_tools
from internlm_jax.agent.tools import BM25, FileTools, PlotTool, SearchTool, builtin_tools, calculate, calculator

AGENTS = {"react": ReActAgent, "rewoo": ReWOOAgent, "internlm2": InternLM2Agent}

__all__ = [
    "ARGS_ERROR", "SUCCESS", "TOOL_ERROR", "ActionExecutor", "ActionResult", "Tool", "Toolkit", "function_schema",
    "make_tool", "tool_api", "AgentResult", "BaseAgent", "Memory", "Step", "StopAgent", "InternLM2Agent",
    "CellResult", "InterpreterTool", "PythonSession", "LLM", "InProcessLLM", "LLMError", "OpenAIClient", "Reply",
    "ScriptedLLM", "NativeProtocol", "OpenAIProtocol", "ReActAgent", "ReWOOAgent", "ToolServer", "remote_tools",
    "BM25", "FileTools", "PlotTool", "SearchTool", "builtin_tools", "calculate", "calculator", "AGENTS",
]
