"""The one resolver from the precision flags (--bits, --bf16/--fp16, the 4-bit settings) to dtypes and to a
bitsandbytes config. Loading, merging, planning, throughput, reporting and scripts/chat.py all ask it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    bits: int  # weight precision of the base: 4 / 8 (bitsandbytes), 16 or 32
    compute: str  # dtype the Trainer computes in: bfloat16 with --bf16, float16 with --fp16, else float32
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: str = "uint8"

    @classmethod
    def from_args(cls, args) -> Precision:
        """From the TrainingArguments of train.py."""
        return cls(bits=args.bits, compute=compute_dtype(args.bf16, args.fp16), quant_type=args.quant_type, double_quant=args.double_quant,
                   quant_storage=args.quant_storage)

    @property
    def load_dtype(self) -> str:
        """dtype the base weights are loaded in; for 4/8 bits the dtype quantization starts from (= compute)."""
        if self.bits == 16:
            return "bfloat16" if self.compute == "bfloat16" else "float16"
        return "float32" if self.bits == 32 else self.compute

    @property
    def name(self) -> str:
        """bf16, fp16 or fp32: the mixed-precision mode, as reports say it."""
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[self.compute]

    @property
    def compute_bytes(self) -> int:
        return 4 if self.compute == "float32" else 2

    def torch_dtype(self, name: str | None = None):
        import torch

        return getattr(torch, name or self.compute)

    def bitsandbytes_config(self):
        """The BitsAndBytesConfig for --bits 4/8, None for 16/32."""
        if self.bits not in (4, 8):
            return None
        return bitsandbytes_config(self.bits, self.torch_dtype(), self.quant_type, self.double_quant,
                                   self.quant_storage)


def compute_dtype(bf16: bool, fp16: bool) -> str:
    """--bf16 / --fp16 / neither -> the dtype the Trainer computes in."""
    return "bfloat16" if bf16 else "float16" if fp16 else "float32"


def matmul_dtype(bf16: bool, fp16: bool, tf32: bool) -> str:
    """What the tensor cores run: the compute dtype, or tf32 for fp32 with --tf32 (peak-FLOP tables use it)."""
    compute = compute_dtype(bf16, fp16)
    return "tf32" if compute == "float32" and tf32 else compute


def bitsandbytes_config(bits: int, compute_dtype, quant_type: str = "nf4", double_quant: bool = True,
                        quant_storage: str = "uint8"):
    """The one builder of transformers' BitsAndBytesConfig (training, the merge's reference, scripts/chat.py)."""
    import torch
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )
