"""Today's chat data through real model chat templates (issue 15): reasoning traces, tool calls, every model's
end-of-turn token, per-turn control, and templates that break the prefix property (Qwen3 drops past reasoning,
DeepSeek-R1 strips it, Mistral moves the system prompt, hand-written templates differ in whitespace).

The templates are the models' own (tests/templates, from llama.cpp's collection, see its README); the tokenizer is
the tiny test tokenizer with each model's special tokens added, so ids are checked token-exact offline.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from types import SimpleNamespace

import pytest
from conftest import ROOT, write_jsonl

from dataset_formats import IGNORE_INDEX, RecordError, encode_segments, get_format, render_segments
from finetune.data import pipeline as data
from finetune.data import preparation
from finetune.data.template_masks import template_end_token, template_traits

# template file -> (special tokens, plain added tokens, end-of-turn token)
MODELS = {
    "qwen3": (["<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], "<|im_end|>"),
    "llama-3.1-instruct": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [], "<|eot_id|>"),
    "gemma-2-it": (["<start_of_turn>", "<end_of_turn>"], [], "<end_of_turn>"),
    "mistral-nemo-instruct-2407": (["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], [], "</s>"),
    "deepseek-r1-distill-qwen": (["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"], [], "<｜end▁of▁sentence｜>"),
    "qwen2.5-instruct": (["<|im_start|>", "<|im_end|>"], [], "<|im_end|>"),
}
_TOKENIZERS: dict = {}


def model_tokenizer(tiny_tokenizer, name: str):
    if name not in _TOKENIZERS:
        specials, added, _ = MODELS[name]
        tokenizer = copy.deepcopy(tiny_tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
        if added:
            tokenizer.add_tokens(added)  # Qwen3's <think> and </think> are single tokens, not special ones
        with open(os.path.join(ROOT, "tests", "templates", f"{name}.jinja"), encoding="utf-8") as handle:
            tokenizer.chat_template = handle.read()
        _TOKENIZERS[name] = tokenizer
    return _TOKENIZERS[name]


REASONING = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "<think>\nThree and three: six.\n</think>\n\n6"},  # the other way to store it
]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "It is 21 C.", "reasoning_content": "Report it."},
]}


def samples_of(tokenizer, record, **options):
    return get_format("chat_template", SimpleNamespace(tokenizer=tokenizer, **options))(record)


def spans(tokenizer, encoded) -> list[tuple[int, str]]:
    """(start, text) of every trained span."""
    out, start = [], None
    for i, label in enumerate(encoded.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            out.append((start, tokenizer.decode(encoded.input_ids[start:i])))
            start = None
    return out


REASONING_SLOT = {"qwen3"}  # templates that read reasoning_content; the others get the model's output as it was


def inference_history(record, k: int, name: str) -> list[dict]:
    """The messages a user passes to apply_chat_template at inference before turn k: the model's earlier answers as
    it generated them (reasoning as reasoning_content where the template reads it, else inline in the content),
    tool-call arguments as objects."""
    out = []
    for message in copy.deepcopy(record["messages"][:k]):
        message["content"] = message["content"] or ""
        reasoning = message.pop("reasoning_content", None)
        if reasoning and name in REASONING_SLOT:
            message["reasoning_content"] = reasoning
        elif reasoning:
            message["content"] = f"<think>\n{reasoning}\n</think>\n\n" + message["content"]
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        out.append(message)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_templates_end_of_turn_token_is_found_from_the_template_and_ends_every_trained_turn(tiny_tokenizer, name):
    tokenizer = model_tokenizer(tiny_tokenizer, name)
    end = MODELS[name][2]
    assert template_end_token(tokenizer) == end
    from finetune.data.pipeline import end_token_id

    assert end_token_id("chat_template", tokenizer) == tokenizer.convert_tokens_to_ids(end)
    for sample in samples_of(tokenizer, REASONING):
        encoded = encode_segments(sample, tokenizer)
        for _, text in spans(tokenizer, encoded):
            assert text.endswith(end), (name, text)
        assert encoded.labels[-1] == tokenizer.convert_tokens_to_ids(end)


def test_qwen3_drops_past_reasoning_so_each_turn_is_its_own_sample_exactly_as_at_inference(tiny_tokenizer):
    tokenizer = model_tokenizer(tiny_tokenizer, "qwen3")
    traits = template_traits(tokenizer)
    assert (traits.reasoning, traits.renders_reasoning, traits.keeps_past_reasoning) == ("reasoning_content", True, False)
    samples = samples_of(tokenizer, REASONING)
    assert samples.strategy == "per_turn"
    assert [render_segments(s) for s in samples] == [
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "{{<think>\nTwo plus two is four.\n</think>\n\n}}[[4<|im_end|>]]",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"  # history as Qwen3 renders it
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        "{{<think>\nThree and three: six.\n</think>\n\n}}[[6<|im_end|>]]",
    ]
    masked = samples_of(tokenizer, REASONING, train_on_reasoning=False)
    assert render_segments(masked[1]).endswith("<think>\nThree and three: six.\n</think>\n\n[[6<|im_end|>]]")


def test_deepseek_r1_strips_reasoning_and_it_is_put_back_after_its_think_prompt(tiny_tokenizer):
    tokenizer = model_tokenizer(tiny_tokenizer, "deepseek-r1-distill-qwen")
    assert not template_traits(tokenizer).renders_reasoning
    samples = samples_of(tokenizer, REASONING)
    assert samples.strategy == "per_turn"
    assert [render_segments(s) for s in samples] == [
        "<s><｜User｜>What is 2+2?<｜Assistant｜><think>\n{{Two plus two is four.\n</think>\n\n}}[[4<｜end▁of▁sentence｜>]]",
        "<s><｜User｜>What is 2+2?<｜Assistant｜>\n\n4<｜end▁of▁sentence｜><｜User｜>And 3+3?<｜Assistant｜><think>\n"
        "{{Three and three: six.\n</think>\n\n}}[[6<｜end▁of▁sentence｜>]]",
    ]
    masked = samples_of(tokenizer, REASONING, train_on_reasoning=False)
    assert [text for s in masked for _, text in spans(tokenizer, encode_segments(s, tokenizer))] == [
        "4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"]


# (template, record, whether the template renders every trained text itself: then each sample's ids are exactly
# the template's render of the conversation up to the sample's last turn)
PARITY = [
    ("qwen3", REASONING, True), ("qwen3", TOOLS, True), ("llama-3.1-instruct", REASONING, True),
    ("llama-3.1-instruct", TOOLS, False), ("gemma-2-it", REASONING, True), ("mistral-nemo-instruct-2407", REASONING, True),
    ("mistral-nemo-instruct-2407", TOOLS, False), ("deepseek-r1-distill-qwen", REASONING, False),
    ("qwen2.5-instruct", TOOLS, True),
]


@pytest.mark.parametrize("name, record, own_render", PARITY,
                         ids=[f"{name}-{'tools' if 'tools' in record else 'reasoning'}" for name, record, _ in PARITY])
def test_every_trained_turn_is_prompted_exactly_as_apply_chat_template_prompts_at_inference(tiny_tokenizer, name, record, own_render):
    tokenizer = model_tokenizer(tiny_tokenizer, name)
    trained = iter(k for k, m in enumerate(record["messages"]) if m["role"] == "assistant")
    for sample in samples_of(tokenizer, record):
        encoded = encode_segments(sample, tokenizer)
        for start, text in spans(tokenizer, encoded):
            k = next(trained)
            prompt = tokenizer.apply_chat_template(inference_history(record, k, name), tools=record.get("tools"),
                                                   add_generation_prompt=True, tokenize=True)["input_ids"]
            assert encoded.input_ids[:start] == prompt, (name, k, tokenizer.decode(prompt))
            assert any(word in text for word in ("four", "six", "Need the tool", "Report it")), text  # reasoning trained
        if own_render:
            full = tokenizer.apply_chat_template(inference_history(record, k + 1, name), tools=record.get("tools"),
                                                 tokenize=True)["input_ids"]
            assert encoded.input_ids == full[: len(encoded.input_ids)], name
    assert next(trained, None) is None  # every assistant turn was trained, once


def test_tool_calls_through_llama31_and_mistral_nemo_train_each_call_with_its_end_token(tiny_tokenizer):
    llama = model_tokenizer(tiny_tokenizer, "llama-3.1-instruct")
    trained = [text for s in samples_of(llama, TOOLS) for _, text in spans(llama, encode_segments(s, llama))]
    assert trained == [  # Llama-3.1 renders a tool-call turn as the call alone: its reasoning is put back in front
        '<think>\nNeed the tool.\n</think>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "<think>\nReport it.\n</think>\n\nIt is 21 C.<|eot_id|>"]
    mistral = model_tokenizer(tiny_tokenizer, "mistral-nemo-instruct-2407")
    samples = samples_of(mistral, TOOLS)
    # Mistral writes the system prompt into the LAST user turn only: turn by turn, as at inference
    assert samples.strategy == "per_turn" and len(samples) == 2
    first, second = (render_segments(s) for s in samples)
    assert "[INST]Be brief.\n\nWeather in Paris?[/INST]" in first and "Be brief." not in second
    assert first.endswith('[[[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>]]')
    assert second.endswith('[/TOOL_RESULTS]{{<think>\nReport it.\n</think>\n\n}}[[It is 21 C.</s>]]')


def test_text_a_template_drops_is_refused_naming_the_turn(tiny_tokenizer):
    llama = model_tokenizer(tiny_tokenizer, "llama-3.1-instruct")
    record = copy.deepcopy(TOOLS)
    record["messages"][2]["content"] = "Let me look that up."  # Llama-3.1 renders only the call of such a turn
    with pytest.raises(RecordError, match=r"turn 2 \(assistant\): the chat template drops its text 'Let me look that up.'"):
        samples_of(llama, record)
    gemma = model_tokenizer(tiny_tokenizer, "gemma-2-it")
    with pytest.raises(RecordError, match="chat template refuses this conversation .*System role not supported"):
        samples_of(gemma, TOOLS)


HAND_WRITTEN_LLAMA3 = (  # a community copy of "the Llama-3 template": one newline after the header in a conversation,
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n"  # two in the
    "{{ m['content'] }}<|eot_id|>{% endfor %}"  # generation prompt
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Ciao"}]}


def test_a_template_whose_generation_prompt_differs_in_whitespace_is_located_in_the_conversation(tiny_tokenizer, caplog):
    tokenizer = copy.deepcopy(model_tokenizer(tiny_tokenizer, "llama-3.1-instruct"))
    tokenizer.chat_template = HAND_WRITTEN_LLAMA3
    with caplog.at_level(logging.INFO, logger="finetune.data.template_masks"):
        samples = samples_of(tokenizer, CHAT)
    assert samples.strategy == "located" and len(samples) == 1
    encoded = encode_segments(samples[0], tokenizer)
    assert [text for _, text in spans(tokenizer, encoded)] == ["Hello<|eot_id|>", "Ciao<|eot_id|>"]
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"]
    assert encoded.input_ids == full  # token-exact: the conversation as the template renders it
    assert "generation prompt ends with '<|start_header_id|>assistant<|end_header_id|>\\n\\n'" in caplog.text
    tokenizer.chat_template = HAND_WRITTEN_LLAMA3.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    with pytest.raises(RecordError, match=r"turn 2 \(assistant\) cannot be located"):
        samples_of(tokenizer, CHAT)


def test_per_turn_train_flags_and_roles_to_train_in_chatml_and_chat_template(tiny_tokenizer):
    record = copy.deepcopy(TOOLS)
    record["messages"][2]["weight"] = 0  # axolotl's per-turn switch: this call is not trained
    qwen = model_tokenizer(tiny_tokenizer, "qwen2.5-instruct")
    trained = [text for s in samples_of(qwen, record) for _, text in spans(qwen, encode_segments(s, qwen))]
    assert trained == ["<think>\nReport it.\n</think>\n\nIt is 21 C.<|im_end|>"]  # no reasoning slot: written inline
    with_tools = samples_of(qwen, record, roles_to_train=("assistant", "tool"))
    trained = [text for s in with_tools for _, text in spans(qwen, encode_segments(s, qwen))]
    assert trained == ['{"temp_c": 21}\n</tool_response><|im_end|>', "<think>\nReport it.\n</think>\n\nIt is 21 C.<|im_end|>"]
    chatml = get_format("chatml", SimpleNamespace(roles_to_train=("assistant", "tool"), train_on_reasoning=False))(record)
    text = render_segments(chatml)
    assert "<|im_start|>tool\n[[{\"temp_c\": 21}]]<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nReport it.\n</think>\n\n[[It is 21 C.]]<|im_end|>")
    assert "[[<tool_call>" not in text  # weight 0
    record["messages"][2]["weight"] = 0.5
    with pytest.raises(RecordError, match=r"messages\[2\]: 'weight' must be true/false or 0/1 \(got 0.5\)"):
        get_format("chatml")(record)
    plain = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello", "train": False}]}
    with pytest.raises(RecordError, match=r"conversations\[1\] sets its own train flag; .*use --dataset_format chatml"):
        get_format("vicuna")(plain)


def test_chatml_renders_reasoning_in_the_qwen3_layout_and_its_saved_template_reproduces_it(tiny_tokenizer):
    text = render_segments(get_format("chatml")(REASONING))
    assert text == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
                    "{{<think>\nTwo plus two is four.\n</think>\n\n}}[[4]]<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                    "<|im_start|>assistant\n{{<think>\nThree and three: six.\n</think>\n\n}}[[6]]<|im_end|>")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    assert data.attach_chat_template(tokenizer, "chatml") == "chatml"  # verified on probes with reasoning and tools
    from finetune.data.conversations import conversation_messages

    messages = conversation_messages(REASONING, tools=True)
    encoded = encode_segments(get_format("chatml")(REASONING), tokenizer)
    assert tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"] == encoded.input_ids
    # a layout without a reasoning slot writes it inline, trained with the answer: never dropped
    assert "ASSISTANT:[[ <think>\nThree and three: six.\n</think>\n\n6]]</s>" in render_segments(get_format("vicuna")(REASONING))


def test_lenient_role_order_for_the_formats_that_render_any_order(tiny_tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Are you there?"},
                           {"role": "system", "content": "Answer briefly."}, {"role": "assistant", "content": "Yes."}]}
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in render_segments(get_format("chatml")(record))
    qwen = model_tokenizer(tiny_tokenizer, "qwen2.5-instruct")
    assert samples_of(qwen, record).strategy == "prefix"
    with pytest.raises(RecordError, match=r"messages\[1\] is a user turn where an assistant turn must be .*chatml or "
                                          "chat_template accept other orders"):
        get_format("vicuna")(record)


def test_bad_reasoning_records_name_the_line_and_are_counted_when_skipped(tmp_path, tiny_tokenizer):
    qwen3 = model_tokenizer(tiny_tokenizer, "qwen3")
    bad_user = {"messages": [{"role": "user", "content": "Hi", "reasoning_content": "hmm"},
                             {"role": "assistant", "content": "Hello"}]}
    both = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "<think>a</think>Hello", "reasoning": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [REASONING, bad_user, both, TOOLS])
    from train import DataArguments

    args = DataArguments(dataset=[path], dataset_format=["chat_template"])
    records = [data.Record(r.data, r.where, "chat_template") for r in data.read_records(path)]
    with pytest.raises(data.DataError, match=r"chat.jsonl:2: messages\[0\] is a user turn with 'reasoning_content': "
                                             "only assistant turns carry reasoning traces"):
        data.tokenize_records(records, qwen3, args)
    args.skip_bad_records = True
    samples, stats = data.tokenize_records(records, qwen3, args)
    summary = stats.summary()
    assert summary["bad_records"] == 2 and "chat.jsonl:3: messages[1] has a reasoning field and a <think> block" in \
        summary["bad_record_examples"][1]
    assert summary["records_kept"] == 2 and summary["samples_kept"] == len(samples) == 3  # REASONING split in two
    assert summary["split_records"] == 1 and summary["samples_per_record"] == 1.5
    assert summary["records_with_reasoning"] == 2 and summary["reasoning_traces"] == 4
    assert summary["template_strategies"] == {"per_turn": 1, "prefix": 1}
    assert summary["records_with_tools"] == 1 and summary["tool_calls"] == 1 and summary["tool_results"] == 1


def test_the_preview_shows_trained_reasoning_and_tool_calls_apart_from_the_answer(tiny_tokenizer):
    qwen3 = model_tokenizer(tiny_tokenizer, "qwen3")
    encoded = encode_segments(samples_of(qwen3, TOOLS)[0], qwen3)
    text = data.preview({"input_ids": encoded.input_ids, "labels": encoded.labels}, qwen3)
    assert ("<|im_start|>assistant\n{{<think>\nNeed the tool.\n</think>}}[[\n\n]]<<<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>>>[[<|im_end|>]]\n<|im_start|>user\n'
            "<tool_response>") in text
    assert text.endswith("{{<think>\nReport it.\n</think>}}[[\n\nIt is 21 C.<|im_end|>]]")
    deepseek = model_tokenizer(tiny_tokenizer, "deepseek-r1-distill-qwen")
    encoded = encode_segments(samples_of(deepseek, REASONING)[0], deepseek)
    text = data.preview({"input_ids": encoded.input_ids, "labels": encoded.labels}, deepseek)
    assert text.endswith("<｜Assistant｜><think>\n{{Two plus two is four.\n</think>}}[[\n\n4<｜end▁of▁sentence｜>]]")


def test_preparing_a_reasoning_dataset_logs_the_templates_traits_and_the_saved_stop_tokens_include_its_end(
        tmp_path, tiny_tokenizer, caplog):
    import train
    from finetune.training.stages import generation_config

    qwen3 = model_tokenizer(tiny_tokenizer, "qwen3")
    path = write_jsonl(tmp_path / "reasoning.jsonl", [REASONING, TOOLS] * 3)
    args = train.DataArguments(dataset=[path], dataset_format=["chat_template"], dataset_prepared_path=str(tmp_path / "prep"))
    with caplog.at_level(logging.INFO, logger="finetune.data"):
        prepared, _, stats = preparation.prepare_datasets(args, qwen3, seed=1, cache=args.dataset_prepared_path, write=True)
    assert "reasoning passed as 'reasoning_content', dropped from past turns" in caplog.text
    assert "end-of-turn token '<|im_end|>'" in caplog.text
    assert "6 with reasoning (12 traces); 3 records rendered as several samples (1.50 samples per record)" in caplog.text
    with open(tmp_path / "prep" / "stats.json") as handle:
        saved = json.load(handle)["train"]
    assert saved["template_strategies"] == {"per_turn": 3, "prefix": 3} and len(prepared) == saved["samples_kept"] == 9
    stop = generation_config(train.GenerationArguments(), qwen3, ["chat_template"]).eos_token_id
    assert qwen3.convert_tokens_to_ids("<|im_end|>") in stop and qwen3.eos_token_id in stop
