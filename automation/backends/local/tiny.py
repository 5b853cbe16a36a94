"""A tiny random chat model built from scratch, for fast tests and dry runs of the local backend.

A byte-level BPE tokenizer is trained on the given texts (a fraction of a second) and a Llama-shaped
model with random weights is created from a config; nothing is downloaded. It trains, saves, loads
and generates like a real model, only small (about 50k parameters) and meaningless.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from automation.backends.local.chat_template import CHATML_WITH_GENERATION, IM_END, IM_START

SPECIAL = ["<|endoftext|>", IM_START, IM_END]


def build_tiny_model(folder: Path, texts: Iterable[str], *, vocab_size: int = 512, hidden: int = 32,
                     layers: int = 2, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(list(texts) or ["hello world"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=IM_START, eos_token=IM_END,
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_WITH_GENERATION
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
