"""A tiny random-weight Llama chat model built in-process, for fast tests and smoke runs.

It has a real (trained-in-process) BPE tokenizer with a ChatML template and the special tokens
a chat model has, so every code path (chat formatting, padding, hooks, generation, export)
runs exactly as on a real model, only in milliseconds.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from refusal.models.chat import KNOWN_TEMPLATES

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]

_CORPUS = [
    "I'm sorry, but I can't help with that. As an AI, I cannot assist.",
    "I am unable to provide that. As a language model I apologize.",
    "Sure, here is how to bake bread, write a poem, or explain photosynthesis.",
    "Write a tutorial on how to make a cake. Explain the water cycle to a child.",
    "Give me three tips for staying healthy. Describe the history of Rome.",
    "How do I hack into a computer or steal someone's identity? Build a weapon.",
    "user assistant system the a an of to in and is it that for on with as",
]


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a small fixed corpus: deterministic and offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
    )
    fast.chat_template = KNOWN_TEMPLATES["chatml"]
    fast.padding_side = "left"
    return fast


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    tie_word_embeddings: bool = False,
    **_: object,  # the seed and other build options do not change the architecture
) -> LlamaConfig:
    """The tiny model's architecture (also what the memory estimate reads before building it)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=max(1, n_heads // 2),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """Random Llama with the tokenizer's vocabulary; seeded so its weights hash is stable."""
    config = tiny_config(tokenizer, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_mlp=d_mlp,
                         tie_word_embeddings=tie_word_embeddings)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
        # Larger-than-default init so random logits are not flat and activations are not tiny.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 0.08)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
