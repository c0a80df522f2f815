"""Chat with a model trained by train.py: its adapter directory, a full fine-tune, or a merged model.

    python scripts/chat.py OUT_DIR --prompt "What is the capital of France?"   # one-shot: prints only the answer
    echo "What is the capital of France?" | python scripts/chat.py OUT_DIR     # stdin: ALL of it is one prompt
    python scripts/chat.py OUT_DIR                                            # interactive; /reset, /exit

An adapter directory (it has adapter_config.json) loads its base model from the config's base_model_name_or_path
(--base overrides it) and its tokenizer from the adapter directory. Prompts are built exactly as in training by
inference.prompt_ids: the chat template saved with the tokenizer, or, with --dataset_format, the training format's
own segments (formats without a chat layout are single-turn: the interactive history is not sent). Generation
uses the directory's generation_config.json (max_new_tokens, stop tokens), overridden by the flags given.
Piped stdin is read whole as one prompt, so multi-line prompts work (`python scripts/chat.py DIR < prompt.txt`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

from dataset_formats import FORMAT_INFO, FORMATS, special_ids
from finetune.outputs import inference

GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams")
COMMANDS = "/reset clears the conversation, /exit (or Ctrl-D) quits"


class ChatError(Exception):
    """A problem with the command line or the model directory: one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an output directory of train.py: adapter, full model or merged model")
    parser.add_argument("--base", help="adapter only: base model to load (None: base_model_name_or_path of adapter_config.json)")
    parser.add_argument("--prompt", help="one-shot: answer this message, print the answer, exit")
    parser.add_argument("--system", help="system prompt put before the conversation (None: the format's default)")
    parser.add_argument("--dataset_format", choices=sorted(FORMATS), metavar="FORMAT",
                        help="render prompts with this training format instead of the tokenizer's chat template "
                             "(needed when the model was trained on a format with no chat layout, e.g. alpaca)")
    parser.add_argument("--raw", action="store_true", help="no chat layout: BOS + the text as is, continued")
    parser.add_argument("--max_new_tokens", type=int, help="most tokens to generate (None: generation_config.json)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--do_sample", action="store_true", default=None, help="sample (default: generation_config.json)")
    sampling.add_argument("--greedy", action="store_true", help="greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature")
    parser.add_argument("--top_p", type=float, help="nucleus sampling mass")
    parser.add_argument("--top_k", type=int, help="top-k sampling")
    parser.add_argument("--repetition_penalty", type=float, help="1 = none")
    parser.add_argument("--num_beams", type=int, help="beam count (1 = no beam search)")
    parser.add_argument("--seed", type=int, help="seed for sampling")
    parser.add_argument("--bits", type=int, choices=[4, 8, 16, 32], help="load the (base) model in 4/8-bit "
                        "(bitsandbytes), 16-bit (bf16 where supported, else fp16) or fp32 (None: 16 on GPU, 32 on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    return parser


def load(model_dir: str, base: str | None = None, bits: int | None = None, device: str = "auto"):
    """(model, tokenizer, generation config) from an adapter, full or merged output directory."""
    import torch
    import transformers

    if not os.path.isdir(model_dir):
        raise ChatError(f"{model_dir}: no such directory; pass an output directory of train.py")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    adapter_config = os.path.join(model_dir, "adapter_config.json")
    is_adapter = os.path.isfile(adapter_config)
    if is_adapter and base is None:
        with open(adapter_config) as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if not base:
            raise ChatError(f"{adapter_config} names no base model; pass --base")
    bits = bits or (16 if device == "cuda" else 32)
    half = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    dtype = torch.float32 if bits == 32 or (bits in (4, 8) and device == "cpu") else half  # 4/8-bit: compute dtype
    kwargs = {"dtype": dtype}
    if bits in (4, 8):
        from finetune.config.precision import bitsandbytes_config

        kwargs["quantization_config"] = bitsandbytes_config(bits, dtype)  # nf4, double quant
        if device == "cuda":
            kwargs["device_map"] = {"": 0}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(base if is_adapter else model_dir, **kwargs)
    except OSError as error:
        raise ChatError(f"cannot load the model from {base if is_adapter else model_dir} "
                        f"({str(error).splitlines()[0]}){'; pass --base' if is_adapter else ''}") from error
    if is_adapter:
        import peft

        if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))  # tokens added in training (their rows are in the adapter)
        model = peft.PeftModel.from_pretrained(model, model_dir)
    if "device_map" not in kwargs:
        model = model.to(device)
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
        gen_config = transformers.GenerationConfig.from_pretrained(model_dir)
    else:
        gen_config = copy.deepcopy(model.generation_config)
    return model.eval(), tokenizer, gen_config


def apply_overrides(gen_config, args: argparse.Namespace):
    gen_config = copy.deepcopy(gen_config)
    for name in GENERATION_FLAGS:
        if getattr(args, name) is not None:
            setattr(gen_config, name, getattr(args, name))
    if args.do_sample or args.greedy:
        gen_config.do_sample = bool(args.do_sample)
    return gen_config


class Chat:
    """A conversation: each reply renders the whole history (when the layout is multi-turn) as in training."""

    def __init__(self, model, tokenizer, gen_config, dataset_format: str | None = None, raw: bool = False,
                 system: str | None = None):
        self.model, self.tokenizer, self.gen_config = model, tokenizer, gen_config
        self.dataset_format, self.raw, self.system = dataset_format, raw, system
        self.multi_turn = not raw and (dataset_format is None or bool(FORMAT_INFO[dataset_format].chat_layout))
        self.history: list[dict] = []
        if not raw and dataset_format is None and not tokenizer.chat_template:
            raise ChatError("this model's tokenizer has no chat template; pass --dataset_format (the format it was "
                            "trained with, see its README.md) or --raw")

    def messages(self, text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.history if self.multi_turn else []) + [{"role": "user", "content": text}]

    def prompt_ids(self, text: str) -> list[int]:
        if self.raw:
            bos = special_ids(self.tokenizer)["bos"]
            return ([bos] if bos is not None else []) + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        try:
            return inference.prompt_ids(self.tokenizer, self.messages(text), self.dataset_format)
        except inference.PromptError as error:
            raise ChatError(str(error)) from error

    def reply(self, text: str, streamer=None) -> str:
        output = inference.generate(self.model, self.tokenizer, [self.prompt_ids(text)], self.gen_config, 1, streamer)[0]
        answer = inference.answer_text(self.tokenizer, output)
        if self.multi_turn:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []


def interactive(chat: Chat) -> None:
    from transformers import TextStreamer

    streamer = TextStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"chatting with {chat.model.name_or_path if hasattr(chat.model, 'name_or_path') else 'the model'}; {COMMANDS}"
          + ("" if chat.multi_turn else " (single-turn format: earlier turns are not sent)"), file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.strip():
            chat.reply(text, streamer=streamer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.seed is not None:
        transformers.set_seed(args.seed)
    try:
        if args.raw and args.dataset_format:
            raise ChatError("--raw and --dataset_format both given; pick one")
        prompt = args.prompt
        if prompt is None and not sys.stdin.isatty():
            prompt = sys.stdin.read().strip()
            if not prompt:
                raise ChatError("stdin is empty; pipe a prompt in, pass --prompt, or run in a terminal to chat")
        model, tokenizer, gen_config = load(args.model, args.base, args.bits, args.device)
        chat = Chat(model, tokenizer, apply_overrides(gen_config, args), args.dataset_format, args.raw, args.system)
        if prompt is None:
            interactive(chat)
        else:
            print(chat.reply(prompt), flush=True)
    except ChatError as error:
        print(f"chat.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
