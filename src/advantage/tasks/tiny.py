"""A character tokenizer and tiny Qwen2 models built locally from a config (nothing downloaded)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; `<bos>` is prepended to every encoded text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
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
