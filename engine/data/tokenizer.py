"""Tokenizers: a real model's from its folder (offline), or a small one trained for the demo."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<ImageHere>"]


def build_demo_tokenizer(texts: Iterable[str], out_dir: str | Path) -> None:
    """A word-level tokenizer over the demo corpus, saved so AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import trainers

    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<ImageHere>"], model_max_length=1024,
    )
    fast.save_pretrained(str(out_dir))


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local folder; LLaMA's has no pad token, so use unk."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer folder not found (set model.tokenizer)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer needs BOS and EOS tokens")
    return tok
