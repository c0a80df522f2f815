"""Tool-calling conversations (issue 15, first part): OpenAI `tool_calls` / `tool` turns and ShareGPT
`function_call` / `observation` turns are read into one shape, checked turn by turn, and rendered by the chatml
layout (Hermes / Qwen2.5 tool layout) and by a tokenizer's own template (Qwen2.5-Instruct's, committed under
tests/templates); tool-call turns are trained with their end token, tool results and tool schemas are masked, and
the saved chat template gives exactly the training prompt of every trained turn."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
from conftest import ROOT

from dataset_formats import IGNORE_INDEX, RecordError, encode_segments, get_format, render_segments
from finetune.data import pipeline as data

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
OPENAI_RECORD = {
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp_c\": 21}"},
        {"role": "assistant", "content": "It is 21 C in Paris."},
    ],
}
SHAREGPT_RECORD = {  # LLaMA-Factory's layout of the same conversation: tools as a JSON string
    "tools": json.dumps([WEATHER["function"]]),
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"temp_c\": 21}"},
        {"from": "gpt", "value": "It is 21 C in Paris."},
    ],
}
QWEN25_TEMPLATE = open(os.path.join(ROOT, "tests", "templates", "qwen2.5-instruct.jinja")).read()


def im_tokenizer(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
                                 replace_extra_special_tokens=False)
    return tokenizer


def trained_spans(tokenizer, encoded) -> list[str]:
    spans, current = [], []
    for token, label in zip(encoded.input_ids + [None], encoded.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans


def test_chatml_renders_tool_calls_in_the_hermes_layout_and_trains_only_the_assistant_turns(tiny_tokenizer):
    tokenizer = im_tokenizer(tiny_tokenizer)
    segments = get_format("chatml")(OPENAI_RECORD)
    text = render_segments(segments, mark=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>\n<|im_start|>tool\n{{\"temp_c\": 21}}<|im_end|>\n" in text
    encoded = encode_segments(segments, tokenizer)
    assert trained_spans(tokenizer, encoded) == [call + "<|im_end|>", "It is 21 C in Paris.<|im_end|>"]


def test_sharegpt_function_call_and_observation_turns_are_the_same_conversation(tiny_tokenizer):
    tools = [WEATHER["function"]]  # LLaMA-Factory stores bare schemas; they are rendered as given
    openai = dict(OPENAI_RECORD, tools=tools)
    assert render_segments(get_format("chatml")(SHAREGPT_RECORD)) == render_segments(get_format("chatml")(openai))


def test_the_saved_chatml_template_gives_the_training_prompt_of_every_trained_turn(tiny_tokenizer):
    tokenizer = im_tokenizer(tiny_tokenizer)
    assert data.attach_chat_template(tokenizer, "chatml") is not None
    encoded = encode_segments(get_format("chatml")(OPENAI_RECORD), tokenizer)
    messages = [dict(m, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
                if m.get("tool_calls") else m for m in OPENAI_RECORD["messages"]]
    full = tokenizer.apply_chat_template(messages, tools=OPENAI_RECORD["tools"], tokenize=True)["input_ids"]
    assert full == encoded.input_ids
    starts = data.answer_starts(encoded.labels)
    assert len(starts) == 2
    for index, start in zip((2, 4), starts):
        prompt_ids = tokenizer.apply_chat_template(messages[:index], tools=OPENAI_RECORD["tools"],
                                                   add_generation_prompt=True, tokenize=True)["input_ids"]
        assert prompt_ids == encoded.input_ids[:start], tokenizer.decode(prompt_ids)


def test_qwen25_template_masks_tool_results_and_trains_each_call_with_its_end_token(tiny_tokenizer):
    tokenizer = im_tokenizer(tiny_tokenizer)
    tokenizer.chat_template = QWEN25_TEMPLATE
    options = SimpleNamespace(tokenizer=tokenizer)
    samples = get_format("chat_template", options)(OPENAI_RECORD)
    assert len(samples) == 1 and samples.strategy == "prefix"  # Qwen2.5 renders history as it rendered each turn
    encoded = encode_segments(samples[0], tokenizer)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert trained_spans(tokenizer, encoded) == [call + "<|im_end|>", "It is 21 C in Paris.<|im_end|>"]
    # the ids are the template's own render (Qwen2.5 puts the tool result in a user turn, masked)
    messages = [dict(m, tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
                if m.get("tool_calls") else m for m in OPENAI_RECORD["messages"]]
    rendered = tokenizer.apply_chat_template(messages, tools=OPENAI_RECORD["tools"], tokenize=False)
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in rendered
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == full[: len(encoded.input_ids)] and tokenizer.decode(full[len(encoded.input_ids):]) == "\n"
    # the ShareGPT layout of the same conversation gives the same sample
    again = encode_segments(get_format("chat_template", options)(SHAREGPT_RECORD | {"tools": OPENAI_RECORD["tools"]})[0], tokenizer)
    assert again.input_ids == encoded.input_ids and again.labels == encoded.labels


@pytest.mark.parametrize("turns, message", [
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
     "ends with a tool call and no result"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "Ok"}],
     r"messages\[1\] is a tool result with no tool call before it"),
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]},
      {"role": "tool", "content": "42"}, {"role": "assistant", "content": "Ok"}],
     r"messages\[1\] tool call 0 \(f\) arguments is not valid JSON"),
    ([{"role": "user", "content": "Hi"},
      {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
      {"role": "assistant", "content": "Ok"}],
     r"messages\[2\] is an assistant turn right after a tool call"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]},
      {"role": "tool", "content": "42"}, {"role": "assistant", "content": "Ok"}],
     r"messages\[1\] tool call 0 needs a function name"),
])
def test_bad_tool_conversations_name_the_turn_and_the_fix(turns, message):
    with pytest.raises(RecordError, match=message):
        get_format("chatml")({"messages": turns})


def test_formats_without_a_tool_layout_refuse_tool_turns_and_name_the_ones_that_have_one():
    with pytest.raises(RecordError, match=r"conversations\[2\] is a tool call or result; .*chatml or chat_template"):
        get_format("sharegpt")(SHAREGPT_RECORD)
    with pytest.raises(RecordError, match="field 'tools' must be a list"):
        get_format("chatml")(dict(OPENAI_RECORD, tools="{\"name\": \"f\"}"))


def test_stats_count_tool_records_calls_and_results_and_a_bad_record_names_its_line(tiny_tokenizer):
    from train import DataArguments

    tokenizer = im_tokenizer(tiny_tokenizer)
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    records = [data.Record(r, f"d.jsonl:{i + 1}", "chatml") for i, r in enumerate([OPENAI_RECORD, SHAREGPT_RECORD, plain])]
    samples, stats = data.tokenize_records(records, tokenizer, DataArguments(dataset=["d.jsonl"], model_max_len=4096))
    assert len(samples) == 3
    assert (stats.records_with_tools, stats.tool_calls, stats.tool_results) == (2, 2, 2)
    broken = copy.deepcopy(OPENAI_RECORD)
    del broken["messages"][3]  # the call's result is gone
    with pytest.raises(data.DataError, match=r"d.jsonl:7: messages\[3\] is an assistant turn right after a tool call"):
        data.tokenize_records([data.Record(broken, "d.jsonl:7", "chatml")], tokenizer,
                              DataArguments(dataset=["d.jsonl"], model_max_len=4096))
    _, skipped = data.tokenize_records([data.Record(broken, "d.jsonl:7", "chatml")], tokenizer,
                                       DataArguments(dataset=["d.jsonl"], model_max_len=4096, skip_bad_records=True))
    assert skipped.bad_records == 1 and skipped.samples_kept == 0
