"""Conversation records: every layout people store chats in, read into one message list and checked.

Messages come out as {"role": system|user|assistant|tool, "content": str}, plus on assistant turns that call tools
"tool_calls": [{"type": "function", "function": {"name", "arguments": dict}}] (the shape transformers' chat
templates expect) and on tool turns "name" / "tool_call_id" when the record gave them. Tool calls are read from
OpenAI-style `tool_calls` and from ShareGPT's `function_call` / `observation` turns (LLaMA-Factory, glaive).
An assistant turn's reasoning trace (`reasoning_content`, `reasoning` or `thinking`, or a leading <think>...</think>
in its content) comes out as "reasoning_content", the key chat templates read; formats without a reasoning slot
get it back inline (`inline_reasoning`). A turn's `train` / `training` / `weight` (true/false, 0/1) comes out as
"train": it overrides the role's default (trained or masked).
"""

from __future__ import annotations

import json
import re

from finetune.data.segments import RecordError

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user", "prompter": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool", "observation": "tool", "function_response": "tool",  # a tool's result
    "function_call": "function_call",  # ShareGPT: an assistant turn whose value is the call (JSON)
}
CONVERSATION_FIELDS = ("conversations", "messages", "conversation")
TOOL_FORMATS = "chatml or chat_template"  # the formats that render tool calls, per-turn train flags, any role order
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
TRAIN_FIELDS = ("train", "training", "weight")
LEADING_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


def conversation_messages(record: dict, field: str | None = None, tools: bool = False) -> list[dict]:
    """ShareGPT ({from, value}), OpenAI/HF ({role, content}) or guanaco ({role: prompter, text}) turns -> messages
    (see the module doc), with the role order checked. `tools`: the format renders tool calls and results, turns'
    train flags and reasoning as its own part of a turn, and accepts repeated roles and later system turns; other
    formats get reasoning inline and refuse the rest."""
    if field is None:
        field = next((name for name in CONVERSATION_FIELDS if name in record), CONVERSATION_FIELDS[0])
    turns = record.get(field)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field {field!r} must be a non-empty list of turns")
    messages = [read_turn(turn, f"{field}[{index}]") for index, turn in enumerate(turns)]
    if not tools:
        calling = next((i for i, m in enumerate(messages) if m["role"] == "tool" or m.get("tool_calls")), None)
        if calling is not None:
            raise RecordError(f"{field}[{calling}] is a tool call or result; this format has no tool layout: "
                              f"use --dataset_format {TOOL_FORMATS}")
        flagged = next((i for i, m in enumerate(messages) if m.get("train", m["role"] == "assistant") != (m["role"] == "assistant")), None)
        if flagged is not None:
            raise RecordError(f"{field}[{flagged}] sets its own train flag; this format trains every assistant turn "
                              f"and nothing else: use --dataset_format {TOOL_FORMATS}, or drop the field")
        messages = inline_reasoning(messages)
    check_role_order(messages, field, lenient=tools)
    return messages


def inline_reasoning(messages: list[dict]) -> list[dict]:
    """Reasoning written into the content as <think>\n{reasoning}\n</think>\n\n{content} (trained with the
    answer), for layouts that have no place of their own for it: never dropped."""
    out = []
    for message in messages:
        message = dict(message)
        reasoning = message.pop("reasoning_content", None)
        if reasoning is not None:
            message["content"] = think_block(reasoning) + message["content"]
        out.append(message)
    return out


def think_block(reasoning: str) -> str:
    """The Qwen3 / DeepSeek-R1 layout of a reasoning trace in front of the answer."""
    return f"<think>\n{reasoning}\n</think>\n\n"


def read_turn(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise RecordError(f"{where} must be an object with 'from' and 'value' (or 'role' and 'content')")
    role = turn.get("from", turn.get("role"))
    if role not in ROLE_ALIASES:
        raise RecordError(f"{where} has role {role!r}; expected one of {', '.join(ROLE_ALIASES)}")
    role = ROLE_ALIASES[role]
    content = next((turn[key] for key in ("value", "content", "text") if key in turn), None)
    extra = read_train_flag(turn, where) | read_reasoning(turn, where, role)
    if role == "function_call":  # the value is the call itself: {"name", "arguments"} or a list of them
        calls = parse_json(content, f"{where} (function_call)") if isinstance(content, str) else content
        return {"role": "assistant", "content": "", "tool_calls": read_tool_calls(calls, where)} | extra
    if content is None and role == "assistant" and turn.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise RecordError(f"{where} ({role}) needs a string 'value' (or 'content')")
    thought = LEADING_THINK.match(content) if role == "assistant" else None
    if thought:
        if "reasoning_content" in extra:
            raise RecordError(f"{where} has a reasoning field and a <think> block in its content; keep one of them")
        extra["reasoning_content"] = thought.group(1).strip()
        content = content[thought.end():]
    message = {"role": role, "content": content} | extra
    if turn.get("tool_calls") is not None:
        if role != "assistant":
            raise RecordError(f"{where}: only an assistant turn can carry 'tool_calls' (this one is {role})")
        message["tool_calls"] = read_tool_calls(turn["tool_calls"], where)
    if role == "tool":
        message.update({key: turn[key] for key in ("name", "tool_call_id") if isinstance(turn.get(key), str)})
    return message


def read_reasoning(turn: dict, where: str, role: str) -> dict:
    key = next((key for key in REASONING_FIELDS if turn.get(key) is not None), None)
    if key is None:
        return {}
    if role not in ("assistant", "function_call"):
        raise RecordError(f"{where} is {with_article(role)} turn with {key!r}: only assistant turns carry reasoning "
                          "traces; move it to the assistant turn it belongs to, or drop the field")
    if not isinstance(turn[key], str):
        raise RecordError(f"{where}: {key!r} must be a string, got {type(turn[key]).__name__}")
    return {"reasoning_content": turn[key].strip()}


def read_train_flag(turn: dict, where: str) -> dict:
    key = next((key for key in TRAIN_FIELDS if turn.get(key) is not None), None)
    if key is None:
        return {}
    value = turn[key]
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return {"train": bool(value)}
    raise RecordError(f"{where}: {key!r} must be true/false or 0/1 (got {value!r}); a turn is trained or not, "
                      "loss weights in between are not supported")


def read_tool_calls(calls, where: str) -> list[dict]:
    """OpenAI ({"type": "function", "function": {...}}) or bare ({"name", "arguments"}) calls -> the OpenAI shape,
    arguments as an object (a JSON string is parsed: templates render them with tojson)."""
    calls = calls if isinstance(calls, list) else [calls]
    if not calls:
        raise RecordError(f"{where}: 'tool_calls' is empty")
    out = []
    for number, call in enumerate(calls):
        spot = f"{where} tool call {number}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{spot} needs a function name ({{'name': ..., 'arguments': {{...}}}})")
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = parse_json(arguments, f"{spot} ({function['name']}) arguments")
        if not isinstance(arguments, dict):
            raise RecordError(f"{spot} ({function['name']}): arguments must be a JSON object, got {type(arguments).__name__}")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            out[-1]["id"] = call["id"]
    return out


def parse_json(text, where: str):
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise RecordError(f"{where} is not valid JSON ({error}); fix the record or pass --skip_bad_records") from error


def conversation_tools(record: dict) -> list[dict] | None:
    """The record's tool schemas (`tools`, a list or a JSON string of one, as glaive and LLaMA-Factory store it)."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        tools = parse_json(tools, "field 'tools'")
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RecordError("field 'tools' must be a list of JSON schemas ({'name', 'description', 'parameters'})")
    for number, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(f"field 'tools'[{number}] has no function name")
    return tools


def reasoning_count(record: dict) -> int:
    """Assistant turns with a non-empty reasoning trace in a record's conversation, for stats.json."""
    turns = next((record[name] for name in CONVERSATION_FIELDS if isinstance(record.get(name), list)), [])
    count = 0
    for turn in turns:
        if isinstance(turn, dict):
            value = next((turn[key] for key in REASONING_FIELDS if turn.get(key) is not None), None)
            if value is None and isinstance(content := turn.get("content", turn.get("value")), str):
                value = (LEADING_THINK.match(content) or [None, None])[1]
            count += isinstance(value, str) and bool(value.strip())
    return count


def tool_counts(record: dict) -> tuple[int, int]:
    """(tool calls, tool results) in a record's conversation, for stats.json; 0, 0 for records of other kinds."""
    turns = next((record[name] for name in CONVERSATION_FIELDS if isinstance(record.get(name), list)), [])
    calls = results = 0
    for turn in turns:
        if isinstance(turn, dict):
            role = ROLE_ALIASES.get(turn.get("from", turn.get("role")))
            calls += len(turn.get("tool_calls") or []) + (role == "function_call")
            results += role == "tool"
    return calls, results


STRICT_ORDER = {"start": ("user",), "user": ("assistant",), "answer": ("user",), "call": ("tool",),
                "tool": ("tool", "assistant")}
LENIENT_ORDER = {"start": ("user", "assistant"), "user": ("user", "assistant", "system"),
                 "answer": ("user", "assistant", "system"), "call": ("tool",), "tool": ("tool", "assistant"),
                 "system": ("user", "assistant", "system")}


def check_role_order(messages: list[dict], field: str, lenient: bool = False) -> None:
    """Optional system first; then user and assistant alternate, except that an assistant turn that calls tools is
    followed by one or more tool results and then an assistant turn; the last turn is an assistant's answer.
    `lenient` (formats that render any order: chatml, chat_template) also accepts turns of the same role in a row
    and system turns later on; tool calls and results keep their order."""
    start = 1 if messages[0]["role"] == "system" else 0
    dialog = messages[start:]
    if not dialog:
        raise RecordError(f"{field} has a system turn but no user/assistant turns")
    previous = "start"
    for offset, message in enumerate(dialog):
        role, spot = message["role"], f"{field}[{start + offset}]"
        allowed = (LENIENT_ORDER if lenient else STRICT_ORDER)[previous]
        if role not in allowed:
            if role == "tool":
                raise RecordError(f"{spot} is a tool result with no tool call before it (the turn before it "
                                  "must be an assistant turn with tool_calls, or another tool result)")
            if previous == "call":
                raise RecordError(f"{spot} is {with_article(role)} turn right after a tool call; the call's result "
                                  "(a tool turn) must come first")
            expected = " or ".join(with_article(a) for a in allowed)
            raise RecordError(f"{spot} is {with_article(role)} turn where {expected} turn must be "
                              "(optional system first, then user and assistant alternating"
                              + (")" if lenient else f"; --dataset_format {TOOL_FORMATS} accept other orders)"))
        if role == "assistant" and not message.get("tool_calls") and not message["content"].strip():
            raise RecordError(f"{spot} is an empty assistant turn")
        previous = {"assistant": "call" if message.get("tool_calls") else "answer"}.get(role, role)
    if previous == "call":
        raise RecordError(f"{field} ends with a tool call and no result; add the tool turn and the answer after it")
    if previous != "answer":
        raise RecordError(f"{field} must end with an assistant turn (the last turn is {dialog[-1]['role']})")


def with_article(word: str) -> str:
    return ("an " if word == "assistant" else "a ") + word  # roles: system, user, assistant, tool


def split_system(messages: list[dict], default: str | None = None) -> tuple[str | None, list[dict]]:
    if messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages
