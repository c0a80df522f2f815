"""Model checkpoints read one tensor at a time, without mapping whole shards: the streamed merge reads its base this
way, and LoftQ reads the 16-bit weights of a base that training loads in 4 bits."""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Optional

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class MergeError(Exception):
    """The adapter, the base or the output directory cannot be merged as asked; the message says what to change."""


class TensorFile:
    """One checkpoint file read tensor by tensor: safetensors by plain reads at the header's offsets (nothing
    mapped, so memory holds only the tensor asked for), or a torch .bin through torch.load(mmap=True)."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self.legacy: Optional[dict] = None
        if path.endswith(".safetensors"):
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in SAFETENSORS_DTYPES:
                    raise MergeError(f"{path}: tensor {name} has dtype {info['dtype']}, which cannot be merged")
                begin, end = info["data_offsets"]
                self.entries[name] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, end - begin)
        else:
            try:
                self.legacy = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as error:
                raise MergeError(f"{path} cannot be read tensor by tensor ({error}); re-save the base with "
                                 "save_pretrained (safetensors) and merge into that") from error
            for name, tensor in self.legacy.items():
                self.entries[name] = (tensor.dtype, tuple(tensor.shape), 0, 0)
        # the order on disk, so reads go forward through the file
        self.names = sorted(self.entries, key=lambda name: self.entries[name][2])

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        if self.legacy is not None:
            return self.legacy[name].clone()
        dtype, shape, offset, size = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            if size and handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != size:
                raise MergeError(f"{self.path}: tensor {name} is truncated; the file is damaged")
        return tensor


def base_checkpoint_files(base_dir: str) -> list[tuple[str, str]]:
    """(source path, merged file name) per shard, in the base's own layout; .bin shards become .safetensors."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(base_dir, index_name)
        if os.path.isfile(index):
            with open(index) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        elif os.path.isfile(os.path.join(base_dir, single)):
            files = [single]
        else:
            continue
        return [(os.path.join(base_dir, name), safetensors_name(name)) for name in files]
    raise MergeError(f"{base_dir} has no model.safetensors or pytorch_model.bin (nor their .index.json); "
                     "pass the base model directory the adapter was trained on")


def safetensors_name(name: str) -> str:
    if name.endswith(".safetensors"):
        return name
    return re.sub(r"^pytorch_model", "model", name).removesuffix(".bin") + ".safetensors"
