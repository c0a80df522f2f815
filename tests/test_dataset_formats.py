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


GOLDEN_MORE = [
    ("alpaca-clean", {"instruction": "Say hi.", "output": "hi"},
     "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
     "\n\n### Instruction:\nSay hi.\n\n### Response:\n[[hi]]</s>"),
    ("self-instruct", {"prompt": "Q: 2+2\nA:", "completion": " 4"}, "<s>Q: 2+2\nA:[[ 4]]</s>"),
    ("longform", {"input": "Write a poem.", "output": "Roses."}, "<s>Write a poem.[[Roses.]]</s>"),
    ("chip2", {"text": "<human>: What is up?\n<bot>: The sky."}, "<s>What is up?[[The sky.]]</s>"),
    ("completion", {"text": "Once upon a time."}, "<s>[[Once upon a time.]]</s>"),
    ("hh-rlhf", {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Ciao."},
     "<s>\n\nHuman: Hi there\n\nAssistant:[[ Hello!]]</s>\n\nHuman: Bye\n\nAssistant:[[ Ciao.]]</s>"),
    ("oasst1", {"text": "### Human: Hi### Assistant: Hello### Human: Bye### Assistant: Ciao"},
     "<s>### Human: Hi### Assistant:[[ Hello]]</s>### Human: Bye### Assistant:[[ Ciao]]</s>"),
    ("chatml", CHAT,
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[[Hello]]"
     "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n[[Ciao]]<|im_end|>"),
    ("vicuna", CHAT, "<s>Be brief. USER: Hi ASSISTANT:[[ Hello]]</s>USER: Bye ASSISTANT:[[ Ciao]]</s>"),
    ("sharegpt", {"conversations": CHAT["conversations"][1:3]},
     "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:[[ Hello]]</s>"),
    ("sharegpt", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:[[ Hello]]</s>"),
    ("llama2_chat", {"messages": [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}]},
     "<s>[INST] Hi [/INST][[ Yo ]]</s>"),
    ("sharegpt.load_role", {"conversations": [{"role": "human", "value": "Hi"}, {"role": "gpt", "value": "Yo"}]},
     "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:[[ Yo]]</s>"),
    ("sharegpt.load_guanaco", {"conversations": [{"role": "prompter", "text": "Hi"}, {"role": "assistant", "text": "Yo"}]},
     "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:[[ Yo]]</s>"),
    ("sharegpt_jokes", {"title": "Cats", "text": "Why? Because.", "explanation": "Puns."},
     "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
     "detailed, and polite answers to the user's questions. USER: Tell me a joke. ASSISTANT:[[ Cats Why? Because.]]"
     "</s>USER: Why is that joke funny? ASSISTANT:[[ Puns.]]</s>"),
    ("pygmalion", {"conversations": [{"role": "system", "value": "A cat.\n<START>"}, {"role": "human", "value": "Hi"},
                                     {"role": "bot", "value": "Meow"}, {"role": "human", "value": "Pet"}, {"role": "bot", "value": "Purr"}]},
     "<s><|system|>Persona: A cat.<|user|> Hi<|model|>[[ Meow]]</s><|user|> Pet<|model|>[[ Purr]]</s>"),
    ("metharme", {"prompt": "<|user|>Hi<|model|>", "generation": "Hello"}, "<s><|user|>Hi<|model|>[[Hello]]</s>"),
    ("gpteacher", {"instruction": "Say hi.", "input": "", "response": "hi"},
     "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
     "\n\n### Instruction:\nSay hi.\n\n### Response:\n[[hi]]</s>"),
    ("oasst", {"INSTRUCTION": "Say hi.", "RESPONSE": "hi"},
     "<s>Below is an instruction that describes a task. Write a response that appropriately completes the request."
     "\n\n### Instruction:\nSay hi.\n\n### Response:\n[[hi]]</s>"),
    ("jeopardy", {"question": "Capital of France", "category": "GEOGRAPHY", "answer": "Paris"},
     "<s>Below is an instruction that describes a task, paired with an input that provides further context. Write a "
     "response that appropriately completes the request.\n\n### Instruction:\nCapital of France\n\n### Input:\n"
     "GEOGRAPHY\n\n### Response:\n[[what is Paris]]</s>"),
    ("explainchoice", {"question": "Q?", "choices": ["a", "b"], "solution": "a, because."},
     "<s>Choose the answer that best answers the question. Explain your reasoning.\n\n\n### Instruction:\nQ?\n\n"
     "### Input:\n- \"a\"\n- \"b\"\n\n### Response:\n[[a, because.]]</s>"),
    ("concisechoice", {"question": "Q?", "choices": ["a", "b"], "explanation": "a"},
     "<s>Choose the answer that best answers the question. Be concise in your response.\n\nUSER: Q?\n- \"a\"\n- \"b\"\n"
     "ASSISTANT:[[ a]]</s>"),
    ("summarizetldr", {"article": "Long text.", "summary": "Short."},
     "<s>USER: Summarize the following article as a TL;DR.\nLong text.\nASSISTANT:[[ Short.]]</s>"),
    ("reflection", {"instruction": "Plan.", "output": "o", "reflection": "r", "corrected": "c"},
     "<s>### Instruction:\nPlan.\n\n### Response:\n[[### Thought:\no\n\n### Agent Reflection:\nr\n\n### Final Response:\nc]]</s>"),
    ("alpaca_chat", {"instruction": "Add.", "input": "2 2", "output": "4"},
     "<s>SYSTEM: Below is an instruction that describes a task, paired with an input that provides further context. "
     "Write a response that appropriately completes the request.\nUSER: Add.\n2 2\nASSISTANT:[[ 4]]</s>"),
    ("alpaca_chat.load_qa", {"question": "Q?", "answer": "A"},
     "<s>SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
     "appropriately and concisely completes the request.\n\n\nUSER: Q?\nASSISTANT:[[ A]]</s>"),
    ("alpaca_chat.load_concise", {"instruction": "Add.", "input": "2 2", "output": "4"},
     "<s>SYSTEM: Below is an instruction from a USER that describes a task, paired with an input that provides further "
     "context. The ASSISTANT writes a response that concisely and appropriately completes the request.\n\n\nUSER: Add."
     "\n2 2\nASSISTANT:[[ 4]]</s>"),
    ("alpaca_chat.load_camel_ai", {"message_1": "Q?", "message_2": "A"},
     "<s>SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
     "appropriately and concisely completes the request.\n\n\nUSER: Q?\nASSISTANT:[[ A]]</s>"),
    ("alpaca_w_system.load_open_orca", {"system_prompt": "Be kind.", "question": "Q?", "response": "A"},
     "<s>### System:\nBe kind.\n### Human:\nQ?\n### Assistant:\n[[A]]</s>"),
    ("context_qa", {"article": "Sky is blue.", "question": "Sky?", "answer": "Blue."},
     "<s>SYSTEM: Use the following contextual information to concisely answer the question.\n\nUSER: Sky is blue.\n"
     "===\nSky?\nASSISTANT:[[ Blue.]]</s>"),
    ("context_qa.load_404", {"article": "Sky is blue.", "unanswerable_question": "Grass?"},
     "<s>SYSTEM: Use the following contextual information to concisely answer the question.\n\nUSER: Sky is blue.\n"
     "===\nGrass?\nASSISTANT:[[ The context provided does not contain any information about your inquiry. Therefore, "
     "I'm unable to answer your question based on the given context.]]</s>"),
    ("context_qa.load_v2", {"context": "Sky is blue.", "question": "Sky?", "answer": "Blue."},
     "<s>Context: Sky is blue.\nQuestion: Sky?\n[[Answer: Blue.]]</s>"),
    ("creative_acr.load_answer", {"instruction": "Q?", "revision": "A"},
     "<s>Answer the following question in a comprehensive, in-depth, and creative way. Additionally your response "
     "should be relevant, accurate, and free of any ambiguity.\nUSER: Q?\nASSISTANT:[[ A]]</s>"),
]
CRITIQUE = {"instruction": "Q?", "answer": "A", "scores": {"refusal": 10}, "critiques": {"refusal": {"explanation": "e", "improvements": "i"}},
            "revision": "B"}


@pytest.mark.parametrize(("name", "record", "expected"), GOLDEN_MORE, ids=[g[0] for g in GOLDEN_MORE])
def test_golden_render_more_formats(name, record, expected):
    assert render_segments(get_format(name)(record)) == expected


def test_creative_acr_critique_and_revise_golden():
    critique = render_segments(get_format("creative_acr.load_critique")(CRITIQUE))
    assert critique.startswith("<s>USER: Given the following Question and Response, critique the Response on a scale of 1-10.")
    assert critique.endswith("\nQuestion: Q?\nAnswer: A\n\nASSISTANT:[[ scores:\n  refusal: 10\ncritiques:\n  refusal:\n"
                             "    explanation: e\n    improvements: i]]</s>")
    revise = render_segments(get_format("creative_acr.load_revise")(CRITIQUE))
    assert revise.startswith("<s>USER: Definitions:\nrefusal: whether the Response refuses")
    assert revise.endswith("Question: Q?\nAnswer: A\nEvaluation:\nscores:\n  refusal: 10\ncritiques:\n  refusal:\n"
                           "    explanation: e\n    improvements: i\n\n\nASSISTANT:[[ B]]</s>")


def test_every_registered_format_has_a_golden_test():
    covered = {name for name, *_ in GOLDEN_MORE} | {"airoboros", "airoboros_chat", "alpaca", "input-output",
                                                    "creative_acr.load_critique", "creative_acr.load_revise",
                                                    "chat_template", "custom"}  # the last two: dedicated tests below
    assert set(FORMATS) - {"pretokenized"} <= covered, sorted(set(FORMATS) - covered)


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
        ("airoboros_chat", {"conversations": [{"from": "gpt", "value": "x"}]}, "conversations[0] is an assistant turn"),
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


# --- guarantees across every format and real tokenizers ----------------------------------------------------------------

ALL_SAMPLES = GOLDEN_MORE + [
    ("airoboros", {"instruction": "What is the capital of France?", "response": "Paris."}, None),
    ("airoboros", {"instruction": "Code it. PLAINFORMAT", "response": "print(1)", "system": "You code."}, None),
    ("airoboros_chat", CHAT, None),
    ("alpaca", {"instruction": "Add.", "input": "2 2", "output": "4"}, None),
    ("input-output", {"input": "2+2=", "output": "4"}, None),
    ("creative_acr.load_critique", CRITIQUE, None),
    ("creative_acr.load_revise", CRITIQUE, None),
]


def with_format_tokens(tokenizer, name):
    from dataset_formats import FORMAT_INFO

    needed = [t for t in FORMAT_INFO[name].special_tokens if t not in tokenizer.get_vocab()]
    if needed:
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_special_tokens({"additional_special_tokens": needed}, replace_extra_special_tokens=False)
    return tokenizer


@pytest.mark.parametrize(("name", "record"), [(n, r) for n, r, _ in ALL_SAMPLES], ids=[n for n, _, _ in ALL_SAMPLES])
def test_masks_are_token_exact_and_every_answer_ends_with_a_trained_end_token(any_tokenizer, name, record):
    from dataset_formats import end_token_id, special_ids

    tokenizer = with_format_tokens(any_tokenizer, name)
    segments = get_format(name)(record)
    encoded = encode_segments(segments, tokenizer)
    end = end_token_id(name, tokenizer)
    # guarantee 3: the sample ends with its trained end token; one per answer
    assert encoded.labels[-1] == end == encoded.input_ids[-1]
    answers = sum(1 for s in segments if s.trainable and s.special is not None)
    assert sum(1 for i, label in zip(encoded.input_ids, encoded.labels) if label == end and i == end) == answers
    # no double BOS, and BOS only where the format puts one
    bos = special_ids(tokenizer)["bos"]
    if bos is not None:
        assert encoded.input_ids.count(bos) == sum(s.special == "bos" for s in segments)
        assert encoded.input_ids[:2] != [bos, bos]
    # guarantee 2: the boundaries are stable (the prompt alone encodes to a prefix), and the trained tokens are
    # exactly the answers and their end tokens (compared without whitespace, which decoders normalise)
    assert encoded.boundary_merges == 0
    text_runs = [s for s in segments if s.special is None]
    if [s.special for s in segments] == ["bos", None, None, "eos"] or [s.special for s in segments] == ["bos", None, "eos"]:
        # one text run: the ids are exactly those of the fully rendered text, with BOS/EOS as ids around it
        whole = tokenizer("".join(s.text for s in text_runs), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert encoded.input_ids == ([bos] if bos is not None else []) + whole + [tokenizer.eos_token_id]
    end_text = tokenizer.convert_ids_to_tokens(end)
    expected = [s.text if s.special is None else end_text for s in segments if s.trainable]
    decoded = "".join(tokenizer.decode([t]) for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX)
    assert "".join(decoded.split()) == "".join("".join(expected).split())


# --- guarantee 5: the saved tokenizer's chat template renders exactly the training prompt ------------------------------

PARITY_DIALOG = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Name a colour.\nJust one."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another, please?"},
    {"role": "assistant", "content": "Green, like grass."},
    {"role": "user", "content": "  Last one  "},
    {"role": "assistant", "content": "Red"},
]


def record_for(name: str, messages: list[dict]) -> dict:
    """The same dialog as each chat-style format's own record layout."""
    system, dialog = (messages[0]["content"], messages[1:]) if messages[0]["role"] == "system" else (None, messages)
    if name == "hh-rlhf":
        return {"chosen": "".join(f"\n\nHuman: {u['content']}\n\nAssistant: {a['content']}" for u, a in zip(dialog[::2], dialog[1::2]))}
    if name == "oasst1":
        return {"text": "".join(f"### Human: {u['content']}### Assistant: {a['content']}" for u, a in zip(dialog[::2], dialog[1::2]))}
    if name == "sharegpt_jokes":
        return {"text": dialog[1]["content"], "explanation": dialog[3]["content"]}
    if name == "airoboros":
        return {"instruction": dialog[0]["content"], "response": dialog[1]["content"], "system": system}
    roles = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in messages]}


CHAT_FORMATS = sorted(n for n, info in __import__("dataset_formats").FORMAT_INFO.items() if info.chat_layout)


@pytest.mark.parametrize("name", CHAT_FORMATS)
def test_chat_template_reproduces_training_prompt_ids(any_tokenizer, name):
    import copy

    from finetune.data import pipeline as data

    tokenizer = with_format_tokens(copy.deepcopy(any_tokenizer), name)
    assert data.attach_chat_template(tokenizer, name) is not None
    messages = PARITY_DIALOG
    if name in ("hh-rlhf", "oasst1"):  # these layouts have no system turn in their records
        messages = PARITY_DIALOG[1:]
    if name == "airoboros":  # single exchange records
        messages = PARITY_DIALOG[:3]
    if name == "sharegpt_jokes":  # a fixed dialog around the record's joke
        messages = [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why? Because."},
                    {"role": "user", "content": "Why is that joke funny?"}, {"role": "assistant", "content": "Puns."}]
    encoded = encode_segments(get_format(name)(record_for(name, messages)), tokenizer)
    full = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert full == encoded.input_ids
    starts = data.answer_starts(encoded.labels)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(starts) == len(answers)
    for index, start in zip(answers, starts):
        prompt_ids = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert prompt_ids == encoded.input_ids[:start], (index, tokenizer.decode(prompt_ids))


def test_non_chat_formats_get_no_template(tiny_tokenizer):
    import copy

    from finetune.data import pipeline as data

    tokenizer = copy.deepcopy(tiny_tokenizer)
    assert data.attach_chat_template(tokenizer, "alpaca") is None and tokenizer.chat_template is None


QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_format_masks_from_the_tokenizers_own_template(tiny_tokenizer):
    import copy
    from types import SimpleNamespace

    from finetune.data import pipeline as data

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = QWEN_STYLE_TEMPLATE
    samples = get_format("chat_template", SimpleNamespace(tokenizer=tokenizer))(CHAT)
    assert len(samples) == 1 and samples.strategy == "prefix"
    encoded = encode_segments(samples[0], tokenizer)
    # the whole conversation is exactly what the template tokenizes to, up to the last answer's end token
    full = tokenizer.apply_chat_template([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}], tokenize=True)["input_ids"]
    assert encoded.input_ids == full[: len(encoded.input_ids)] and tokenizer.decode(full[len(encoded.input_ids):]) == "\n"
    from dataset_formats import end_token_id

    assert encoded.labels[-1] == end_token_id("chat_template", tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # answers + their end-of-turn token trained; the newline after it is prompt; "<|im_end|>" stays one token
    assert trained_text(tokenizer, encoded) == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert encoded.input_ids.count(im_end) == 5
    # generation prompts from the template stop exactly where each answer starts
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert encoded.input_ids[: data.answer_starts(encoded.labels)[0]] == prompt_ids


def test_a_template_that_forgets_the_history_trains_each_turn_as_it_prompts_at_inference(tiny_tokenizer):
    import copy
    from types import SimpleNamespace

    tokenizer = copy.deepcopy(tiny_tokenizer)
    # renders only the LAST message: earlier turns vanish when a turn is added (no end token: EOS is appended)
    tokenizer.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    samples = get_format("chat_template", SimpleNamespace(tokenizer=tokenizer))(CHAT)
    assert samples.strategy == "per_turn"
    assert [render_segments(sample) for sample in samples] == ["Hi>[[Hello]]</s>", "Bye>[[Ciao]]</s>"]


def test_custom_format_from_flags():
    from types import SimpleNamespace

    options = SimpleNamespace(custom_format="<|q|>{instruction}\n<|ctx|>{input}\n<|a|>", custom_no_input_format="<|q|>{instruction}\n<|a|>",
                              custom_system_format="<|sys|>{system}\n", custom_system_prompt="Be kind.",
                              custom_field_instruction="q", custom_field_input="ctx", custom_field_output="a", custom_field_system=None)
    render = get_format("custom", options)
    assert render_segments(render({"q": "Add", "ctx": "2 2", "a": "4"})) == "<s><|sys|>Be kind.\n<|q|>Add\n<|ctx|>2 2\n<|a|>[[4]]</s>"
    assert render_segments(render({"q": "Hi", "a": "Yo", "system": "Own."})) == "<s><|sys|>Own.\n<|q|>Hi\n<|a|>[[Yo]]</s>"
    with pytest.raises(RecordError, match="missing field 'a'"):
        render({"q": "Hi"})
    defaults = get_format("custom", SimpleNamespace())
    assert render_segments(defaults({"instruction": "Hi", "output": "Yo"})) == "<s>Hi [[Yo]]</s>"


def test_default_system_prompt_fills_conversations_without_one_and_is_masked(tiny_tokenizer):
    import train
    from finetune.data import pipeline as data

    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    own = {"messages": [{"role": "system", "content": "Be terse."}, *chat["messages"]]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    args = train.DataArguments(dataset=["x.jsonl"], dataset_format=["llama2_chat", "sharegpt"], default_system_prompt="You are kind.")
    records = [data.Record(chat, "x:1", "llama2_chat"), data.Record(own, "x:2", "llama2_chat"),
               data.Record(sharegpt, "x:3", "sharegpt")]
    samples, _ = data.tokenize_records(records, tiny_tokenizer, args)
    texts = [tiny_tokenizer.decode(s["input_ids"]) for s in samples]
    assert "You are kind." in texts[0] and "You are kind." not in texts[1] and "Be terse." in texts[1]
    assert "You are kind." in texts[2]
    trained = tiny_tokenizer.decode([t for t in samples[0]["labels"] if t != -100])
    assert "kind" not in trained and "Hello" in trained
    plain, _ = data.tokenize_records(records[:1], tiny_tokenizer, train.DataArguments(dataset=["x.jsonl"], dataset_format=["llama2_chat"]))
    assert "You are kind." not in tiny_tokenizer.decode(plain[0]["input_ids"])
