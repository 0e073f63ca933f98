"""A character tokenizer and tiny Qwen2 models built locally from a config (nothing downloaded).

`make_tiny_model(out_dir)` (public: `advantage.make_tiny_model`, `advantage init-model OUT`)
writes one for a toy task of your own; `builtin:tiny-random` and `builtin:small-random` are the
same models over the built-in character set, cached.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from ..engine.configlib import ConfigError, new_folder

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-*/=<>:;,.?!'\"()[]\n"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]

# name → Qwen2 sizes. `tiny` is the demo model (≈2.4M parameters with this vocabulary).
SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=512),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, intermediate_size=1408),
    "micro": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=128),
}  # fmt: skip


def char_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character of `chars` (others are `<unk>`); `<bos>` is prepended to every
    encoded text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(chars)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_qwen2(
    size: str = "tiny", vocab_size: int | None = None, seed: int = 0
) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2 causal LM of the named size."""
    import torch

    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; valid: {', '.join(SIZES)}")
    vocab_size = vocab_size or len(SPECIALS) + len(CHARS)
    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def make_tiny_model(
    out_dir: str | Path, size: str = "tiny", chars: str | None = None, seed: int = 0
) -> Path:
    """Write a freshly initialised Qwen2 of `size` (tiny ≈ 2.4M parameters, small ≈ 24M, micro
    ≈ 0.08M) and a character tokenizer over `chars` (default: letters, digits, space and
    punctuation; `<pad> <eos> <bos> <unk>` are added) to `out_dir`, a new or empty folder that
    `model.name_or_path` then takes. For a toy task of your own: warm it up with `advantage sft`
    (a model trained from scratch wants train.lr ≈ 1e-3), then train it with RL."""
    out = new_folder(out_dir)
    if chars is not None and not chars:
        raise ConfigError("chars: give at least one character")
    if size not in SIZES:
        raise ConfigError(f"size: unknown tiny model size {size!r}; valid: {', '.join(SIZES)}")
    tokenizer = char_tokenizer(chars or CHARS)
    model = tiny_qwen2(size, vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
