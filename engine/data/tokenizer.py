"""Tokenizers: a real model's from its folder (offline), or a small one trained for the demo.

The demo tokenizer is word-level (lower-cased words and punctuation runs) over the synthetic
corpus and the prompt templates. Like LLaMA's, it adds BOS in front when asked for special
tokens, and it keeps `<s>`, `</s>`, `<unk>`, `<pad>` and `<ImageHere>` as special tokens. It is
saved as `tokenizer.json` + `tokenizer_config.json`, so `AutoTokenizer.from_pretrained` loads it
with no network and no custom code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<ImageHere>"
SPECIALS = [UNK, BOS, EOS, PAD, IMAGE]
DEMO_MAX_LENGTH = 1024


def _without_specials(text: str) -> str:
    # Special tokens are cut out of the text before the word splitter sees it; training on the
    # raw text would learn fragments like "></" that never occur at encoding time.
    return re.sub("|".join(re.escape(s) for s in SPECIALS), " ", text)


def build_demo_tokenizer(texts: Iterable[str], out_dir: str | Path, model_max_length: int = DEMO_MAX_LENGTH) -> Path:
    """Train a word-level tokenizer on `texts` and save it to `out_dir`; returns `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ?"
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator([_without_specials(t) for t in texts], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IMAGE], model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def ensure_pad_token(tok):
    """LLaMA and Mistral tokenizers ship without a pad token. Fine-tuners (MiniGPT-v2, Alpaca-LoRA)
    pad with unk, or with eos where there is no unk. Padding is masked out of attention and
    loss, so the choice only needs to be a valid id; unk is preferred because eos as pad would
    make a padded EOS look like a real one to code that searches ids."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local folder (never the network), with a pad token."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: tokenizer folder not found; set model.tokenizer to a folder holding "
            "tokenizer.json or tokenizer.model (a Hugging Face model folder)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load a tokenizer from this folder ({e})") from e
    ensure_pad_token(tok)
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer needs BOS and EOS tokens (set bos_token/eos_token in tokenizer_config.json)")
    if tok.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad, unk or eos token to pad with")
    return tok
