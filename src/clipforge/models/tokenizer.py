"""Text tokenizers: a small subword BPE trained on captions (Hugging Face ``tokenizers``).

Every tokenizer maps a list of texts to ``(input_ids, attention_mask)``, both LongTensor N x L
with the layout ``[SOT] tokens... [EOT] [PAD]...``. Texts longer than the context are cut so
that EOT is still the last real token. The text tower pools at
``eot_position = attention_mask.sum(1) - 1``: that is the contract with the model.

- ``BPETokenizer.train(corpus, vocab_size, context_length)`` / ``.save(directory)`` /
  ``BPETokenizer.load(path_to_tokenizer_json, context_length)``; ``tok(texts)``; ``tok.decode(ids)``;
  ``tok.spec()`` (JSON-able, stored in checkpoint ``config.json``).
- ``load_tokenizer(spec, directory)`` rebuilds any tokenizer from its spec (dispatch on
  ``spec["kind"]``; a CLIP-BPE kind for OpenCLIP weights can be added here later).
- ``train_tokenizer_for(data_cfg, context_length)`` trains the BPE on the training data's captions.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

# The Rust tokenizer uses a thread pool; a DataLoader forking after it was used would make it
# warn and disable itself. Our batches are small, so single-threaded encoding costs nothing.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<sot>", "<eot>"
SPECIAL_TOKENS = [PAD, UNK, SOT, EOT]  # in id order: pad is 0
WORD_START = "\u2581"  # "▁" marks a piece that starts a word, so decoding can restore spaces
# Characters every tokenizer knows, so prompts outside the training captions still tokenize
# into pieces instead of <unk>.
BASE_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation + WORD_START
TOKENIZER_FILE = "tokenizer.json"


class BPETokenizer:
    """Lower-cased byte-pair encoding over words and punctuation, with SOT/EOT/PAD."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; was it trained by clipforge?")
        self._tok = tokenizer
        self.context_length = context_length
        self.pad_id = tokenizer.token_to_id(PAD)
        self.unk_id = tokenizer.token_to_id(UNK)
        self.sot_id = tokenizer.token_to_id(SOT)
        self.eot_id = tokenizer.token_to_id(EOT)
        # SOT/EOT around every text; truncation reserves room for both, padding fills to L
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{SOT} $A {EOT}", special_tokens=[(SOT, self.sot_id), (EOT, self.eot_id)]
        )
        tokenizer.enable_truncation(max_length=context_length)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=PAD, length=context_length)

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, corpus: list[str], vocab_size: int, context_length: int) -> "BPETokenizer":
        """Learn BPE merges on ``corpus``. Deterministic: the same corpus gives the same merges."""
        if not corpus:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip(),
             normalizers.Replace(Regex(r"\s+"), " ")]
        )
        # words keep their leading "▁" (SentencePiece style) and punctuation is split off.
        # Word boundaries live inside characters, not in a suffix, so every initial token is a
        # single character with a sorted id; that keeps the trainer's tie-breaks, and thus the
        # merges and ids, identical from run to run.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always"),
             pre_tokenizers.Punctuation()]
        )
        tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=list(BASE_CHARACTERS),
            show_progress=False,
        )
        tok.train_from_iterator(list(corpus), trainer=trainer)
        return cls(tok, context_length)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path, context_length: int) -> "BPETokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)), context_length)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, LongTensor N x context_length each."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(texts), self.context_length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long).reshape(ids.shape)
        return ids, mask

    def decode(self, ids) -> str:
        """Text of one id sequence (list or 1-D tensor); special tokens and padding are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def spec(self) -> dict:
        return {
            "kind": self.kind,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "sot_id": self.sot_id,
            "eot_id": self.eot_id,
        }

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"


TOKENIZER_KINDS = {"bpe": BPETokenizer}


def load_tokenizer(spec: dict, directory: str | Path) -> BPETokenizer:
    """Rebuild the tokenizer described by ``spec`` (from ``tokenizer.spec()``) from ``directory``."""
    kind = spec.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known kinds: {sorted(TOKENIZER_KINDS)}")
    tok = TOKENIZER_KINDS[kind].load(Path(directory) / TOKENIZER_FILE, spec["context_length"])
    got = tok.spec()
    for key in ("vocab_size", "pad_id", "sot_id", "eot_id"):
        if key in spec and spec[key] != got[key]:
            raise ValueError(
                f"tokenizer in {directory} does not match its spec: {key} is {got[key]}, spec says {spec[key]}"
            )
    return tok


def train_tokenizer_for(data_cfg, context_length: int) -> BPETokenizer:
    """Train the BPE tokenizer on captions of ``data_cfg.train`` (same config -> same merges)."""
    from clipforge.data.loader import caption_corpus_for  # data depends on nothing in models

    corpus = caption_corpus_for(data_cfg, data_cfg.tokenizer.corpus_size)
    return BPETokenizer.train(corpus, data_cfg.tokenizer.vocab_size, context_length)
