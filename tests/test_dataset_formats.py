"""Golden tests per format (exact rendered text, exact label mask) and the llama-2 chat ids against Meta's layout."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import LLAMA2_TOKENIZER

from dataset_formats import (
    FORMATS,
    IGNORE_INDEX,
    RecordError,
    encode_segments,
    get_format,
    prompt_segments,
    render_segments,
)

CHAT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Ciao"},
    ]
}


def trained_text(tokenizer, encoded) -> list[str]:
    """The trained spans, decoded one contiguous span at a time."""
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a trained label must be the token at its own position"
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


# --- golden renders ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "record", "expected"),
    [
        (
            "airoboros",
            {"instruction": " What is 2+2? ", "response": " 4 "},
            "<s>A chat.\nUSER: What is 2+2?\nASSISTANT:[[ 4]]</s>",
        ),
        (
            "airoboros",
            {"instruction": "Hi", "response": "Hello", "system": "You are Bob."},
            "<s>You are Bob.\nUSER: Hi\nASSISTANT:[[ Hello]]</s>",
        ),
        (
            "airoboros",
            {"instruction": "Write fizzbuzz in python.\n\n  PLAINFORMAT", "response": "print(1)"},
            "<s>A chat.\nUSER: Write fizzbuzz in python. PLAINFORMAT\nASSISTANT:[[ print(1)]]</s>",
        ),
        (
            "airoboros",
            {"instruction": "raw prompt", "response": "raw answer", "skip_prompt_formatting": True},
            "<s>raw prompt\n[[raw answer]]</s>",
        ),
        (
            "airoboros_chat",
            CHAT,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST][[ Hello ]]</s><s>[INST] Bye [/INST][[ Ciao ]]</s>",
        ),
        (
            "airoboros_chat",
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            "<s>[INST] Q [/INST][[ A ]]</s>",
        ),
        (
            "alpaca",
            {"instruction": "Add.", "input": "2 2", "output": "4"},
            "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2 2"
            "\n\n### Response:\n[[4]]</s>",
        ),
        (
            "alpaca",
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n[[hi]]</s>",
        ),
        ("input-output", {"input": "2+2=", "output": "4"}, "<s>2+2=[[4]]</s>"),
    ],
)
def test_golden_render(name, record, expected):
    assert render_segments(get_format(name)(record)) == expected


def test_every_assistant_turn_is_trained_with_its_eos(tiny_tokenizer):
    encoded = encode_segments(FORMATS["airoboros_chat"](CHAT), tiny_tokenizer)
    assert trained_text(tiny_tokenizer, encoded) == [" Hello </s>", " Ciao </s>"]
    assert encoded.input_ids.count(tiny_tokenizer.eos_token_id) == 2
    assert encoded.input_ids.count(tiny_tokenizer.bos_token_id) == 2  # one per turn, as Meta's layout has
    assert encoded.boundary_merges == 0


@pytest.mark.parametrize(
    ("name", "record", "answer"),
    [
        ("airoboros", {"instruction": "What is the capital of France?", "response": "Paris is the capital."}, " Paris is the capital.</s>"),
        ("alpaca", {"instruction": "Explain.", "output": "Because numbers."}, "Because numbers.</s>"),
        ("input-output", {"input": "Hello! How are", "output": " you today?"}, " you today?</s>"),
    ],
)
def test_label_mask_is_exactly_the_response_and_eos(tiny_tokenizer, name, record, answer):
    encoded = encode_segments(FORMATS[name](record), tiny_tokenizer)
    assert trained_text(tiny_tokenizer, encoded) == [answer]
    assert encoded.labels[-1] == tiny_tokenizer.eos_token_id
    assert encoded.input_ids[0] == tiny_tokenizer.bos_token_id and encoded.input_ids.count(tiny_tokenizer.bos_token_id) == 1
    # inference parity: the prompt alone encodes to exactly the masked prefix
    prompt_ids = encode_segments(prompt_segments(FORMATS[name](record)), tiny_tokenizer).input_ids
    first_trained = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[:first_trained] == prompt_ids


def test_train_on_source_trains_everything(tiny_tokenizer):
    encoded = encode_segments(FORMATS["alpaca"]({"instruction": "a", "output": "b"}), tiny_tokenizer, train_on_source=True)
    assert encoded.labels == encoded.input_ids


def test_special_token_text_in_data_stays_plain_text(tiny_tokenizer):
    encoded = encode_segments(FORMATS["input-output"]({"input": "say </s> now", "output": "ok"}), tiny_tokenizer)
    assert encoded.input_ids.count(tiny_tokenizer.eos_token_id) == 1  # only the real, final EOS


def test_boundary_inside_a_token_is_counted_and_trained(tiny_tokenizer):
    # "ing" glued to the prompt's last word: whatever the merge, trained ids are a suffix and the merge is counted
    segments = [FORMATS["input-output"]({"input": "The quick brown fox jump", "output": "s over"})][0]
    encoded = encode_segments(segments, tiny_tokenizer)
    whole = tiny_tokenizer("The quick brown fox jumps over", add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[1:-1] == whole  # the ids are those of the full text, never a re-split
    assert encoded.labels[-1] == tiny_tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("name", "record", "message"),
    [
        ("airoboros", {"response": "x"}, "missing field 'instruction'"),
        ("airoboros", {"instruction": "x", "response": "  "}, "field 'response' is empty"),
        ("airoboros", {"instruction": 3, "response": "x"}, "must be a string"),
        ("alpaca", {"instruction": "x"}, "missing field 'output'"),
        ("airoboros_chat", {"conversations": []}, "non-empty list"),
        ("airoboros_chat", {"conversations": [{"from": "gpt", "value": "x"}]}, "conversations[0] is a assistant turn"),
        (
            "airoboros_chat",
            {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}, {"from": "human", "value": "z"}]},
            "must end with an assistant turn",
        ),
        ("airoboros_chat", {"conversations": [{"from": "robot", "value": "x"}]}, "role 'robot'"),
        ("airoboros_chat", {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}, "empty assistant turn"),
    ],
)
def test_bad_records_name_the_problem(name, record, message):
    with pytest.raises(RecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
        FORMATS[name](record)


def test_unknown_format_lists_the_known_ones():
    with pytest.raises(KeyError, match="airoboros_chat"):
        get_format("airoborus")


# --- the real Llama-2 tokenizer against Meta's reference layout --------------------------------------------------------


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    if not os.path.isfile(LLAMA2_TOKENIZER):
        pytest.skip("../shared/data/tokenizers/llama2 is absent")
    import json

    import sentencepiece
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("llama2")
    shutil.copy(LLAMA2_TOKENIZER, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    return AutoTokenizer.from_pretrained(folder), sentencepiece.SentencePieceProcessor(model_file=LLAMA2_TOKENIZER)


def meta_reference(sp, dialog: list[dict]) -> list[int]:
    """llama/generation.py chat_completion, verbatim in spirit: system folded into the first user turn."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": "user", "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]}] + dialog[2:]
    ids: list[int] = []
    for user, answer in zip(dialog[::2], dialog[1::2]):
        ids += [sp.bos_id()] + sp.encode(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ") + [sp.eos_id()]
    return ids


@pytest.mark.parametrize(
    "turns",
    [
        [("system", "You are a helpful, respectful and honest assistant."), ("human", "What is the capital of France?"),
         ("gpt", "The capital of France is Paris."), ("human", "And of Italy?"), ("gpt", "Rome.")],
        [("human", "Write a haiku about rain.\nMake it sad."), ("gpt", "Grey drops on the glass\nthe street forgets its colours\nI wait, and it falls")],
        [("human", "2+2?"), ("gpt", "4"), ("human", "Times 3?"), ("gpt", "12"), ("human", "Minus 1?"), ("gpt", "11, since 12 - 1 = 11.")],
    ],
)
def test_llama2_chat_ids_match_meta_reference(llama2, turns):
    tokenizer, sp = llama2
    record = {"conversations": [{"from": role, "value": text} for role, text in turns]}
    encoded = encode_segments(FORMATS["airoboros_chat"](record), tokenizer)
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert encoded.input_ids == meta_reference(sp, [{"role": roles[r], "content": t} for r, t in turns])
    answers = [t for r, t in turns if r == "gpt"]
    assert trained_text(tokenizer, encoded) == [f"{a.strip()} </s>" for a in answers]  # decode drops the leading ▁
    assert encoded.boundary_merges == 0
