"""Text tokenizers: a small subword BPE trained on captions (Hugging Face ``tokenizers``).

Every tokenizer maps a list of texts to ``(input_ids, attention_mask)``, both LongTensor N x L
with the layout ``[SOT] tokens... [EOT] [PAD]...``. Texts longer than the context are cut so
that EOT is still the last real token. The text tower pools at
``eot_position = attention_mask.sum(1) - 1``: that is the contract with the model.

- ``BPETokenizer.train(corpus, vocab_size, context_length)`` / ``.save(directory)`` /
  ``BPETokenizer.load(path_to_tokenizer_json, context_length)``; ``tok(texts)``; ``tok.decode(ids)``;
  ``tok.spec()`` (JSON-able, stored in checkpoint ``config.json``).
- ``ClipBPETokenizer``: OpenAI CLIP's byte-level BPE (49,408 tokens), for weights imported from
  OpenCLIP; built from ``bpe_simple_vocab_16e6.txt.gz`` (an installed ``open_clip_torch`` or a given
  file) and then stored as a plain ``tokenizer.json`` in the checkpoint like any other.
- ``load_tokenizer(spec, directory)`` rebuilds any tokenizer from its spec (dispatch on
  ``spec["kind"]``).
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

    def truncated(self, texts: list[str] | str) -> list[bool]:
        """For each text, whether ``__call__`` cuts it to fit the context (its outputs are unchanged);
        callers use it to say how many texts lost their end."""
        if isinstance(texts, str):
            texts = [texts]
        # a cut encoding keeps the tokens it dropped in ``overflowing``
        return [bool(e.overflowing) for e in self._tok.encode_batch(list(texts))]

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


# ----------------------------------------------------------------------------- CLIP's BPE (OpenCLIP)
CLIP_SOT, CLIP_EOT = "<start_of_text>", "<end_of_text>"
CLIP_PAD_ID = 0  # OpenCLIP pads with id 0 (the token "!"); the attention mask tells real from padding
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses from that file (the rest were never trained)
# CLIP's word pattern, applied to lower-cased text; letters, single digits, runs of other symbols
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters: printable
    Latin-1 bytes map to themselves, the others to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP's vocabulary lists the printable bytes first, then the remapped ones
    return {b: table[b] for b in printable} | {b: c for b, c in table.items() if b not in printable}


def find_clip_vocab_file(vocab_file: str | Path | None = None) -> Path:
    """The CLIP BPE merges file: the one given, else the copy inside an installed open_clip_torch."""
    if vocab_file is not None:
        path = Path(vocab_file)
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {path}")
        return path
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / CLIP_VOCAB_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the CLIP tokenizer needs {CLIP_VOCAB_FILE}: install open_clip_torch (pip install open_clip_torch) "
        "or pass the file with --vocab"
    )


def build_clip_bpe(vocab_file: Path) -> Tokenizer:
    """A ``tokenizers`` Tokenizer that splits text as OpenCLIP's SimpleTokenizer does (lower-case,
    collapse whitespace, CLIP's word pattern, byte-level BPE with an end-of-word ``</w>``).

    Not reproduced: OpenCLIP also runs ftfy and unescapes HTML entities ("&amp;"), which only
    changes mojibake or entity-laden text.
    """
    import gzip

    lines = gzip.open(vocab_file).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{vocab_file} is not CLIP's BPE merges file (expected {CLIP_NUM_MERGES} merge lines)")
    symbols = list(byte_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {piece: i for i, piece in enumerate(vocab_list)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    # bytes back to text first, then the end-of-word marks become spaces (as OpenCLIP decodes)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    tok.add_special_tokens([CLIP_SOT, CLIP_EOT])  # matched in text as OpenCLIP's pattern does
    return tok


class ClipBPETokenizer(BPETokenizer):
    """OpenAI CLIP's tokenizer for imported OpenCLIP weights: same ids as ``open_clip.tokenize``
    (SOT 49406, EOT 49407, padding 0), plus the attention mask our text tower pools with."""

    kind = "clip-bpe"

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
        self._tok = tokenizer
        self.context_length = context_length
        self.sot_id = tokenizer.token_to_id(CLIP_SOT)
        self.eot_id = tokenizer.token_to_id(CLIP_EOT)
        if self.sot_id is None or self.eot_id is None:
            raise ValueError(f"tokenizer lacks {CLIP_SOT}/{CLIP_EOT}; is it a CLIP BPE tokenizer?")
        self.pad_id = CLIP_PAD_ID
        self.unk_id = None
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLIP_SOT} $A {CLIP_EOT}", special_tokens=[(CLIP_SOT, self.sot_id), (CLIP_EOT, self.eot_id)]
        )
        tokenizer.enable_truncation(max_length=context_length)
        pad_token = tokenizer.id_to_token(CLIP_PAD_ID)
        tokenizer.enable_padding(pad_id=CLIP_PAD_ID, pad_token=pad_token, length=context_length)

    @classmethod
    def from_vocab_file(cls, vocab_file: str | Path | None, context_length: int) -> "ClipBPETokenizer":
        """From ``bpe_simple_vocab_16e6.txt.gz`` (``None``: the one in an installed open_clip_torch)."""
        return cls(build_clip_bpe(find_clip_vocab_file(vocab_file)), context_length)

    def decode(self, ids) -> str:
        """Text up to the end-of-text token (the padding id 0 is a real token, "!", in CLIP's vocabulary)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        return self._tok.decode(ids, skip_special_tokens=True).strip()

    @classmethod
    def train(cls, *args, **kwargs):
        raise TypeError("the CLIP tokenizer is fixed; build it with ClipBPETokenizer.from_vocab_file")


# ----------------------------------------------------------------------------- a pretrained encoder's own
class HFTokenizer(BPETokenizer):
    """The ``tokenizer.json`` of a pretrained Hugging Face encoder (``model.text_tower = "hf"``), e.g.
    all-MiniLM-L6-v2's WordPiece: ``[CLS] tokens... [SEP] [PAD]...``, so the usual contract holds
    (the last real token is ``[SEP]``). ``encode_piece`` gives FLAME's facet prompts without [CLS]."""

    kind = "hf"
    SPECIALS = (("[CLS]", "[SEP]", "[PAD]"), ("<s>", "</s>", "<pad>"))  # BERT / RoBERTa spellings

    def __init__(self, tokenizer: Tokenizer, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold [CLS] and [SEP], got {context_length}")
        for sot, eot, pad in self.SPECIALS:
            if all(tokenizer.token_to_id(t) is not None for t in (sot, eot, pad)):
                break
        else:
            raise ValueError("the pretrained tokenizer has neither [CLS]/[SEP]/[PAD] nor <s>/</s>/<pad>; only "
                             "BERT- and RoBERTa-style encoders are supported")
        self._tok = tokenizer
        self.context_length = context_length
        self.sot_id, self.eot_id, self.pad_id = (tokenizer.token_to_id(t) for t in (sot, eot, pad))
        self.unk_id = tokenizer.token_to_id("[UNK]")
        # the file's own post-processor adds [CLS]/[SEP]; truncation and padding follow our context length
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{sot} $A {eot}", special_tokens=[(sot, self.sot_id), (eot, self.eot_id)])
        tokenizer.enable_truncation(max_length=context_length)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad, length=context_length)

    @classmethod
    def from_pretrained(cls, spec: str, context_length: int) -> "HFTokenizer":
        """From ``model.text_pretrained`` (``package:NAME`` or an HF model directory)."""
        from clipforge.models.hf_text import HF_TOKENIZER_FILE, resolve_pretrained

        return cls.load(resolve_pretrained(spec) / HF_TOKENIZER_FILE, context_length)

    def encode_piece(self, text: str) -> list[int]:
        """Token ids of ``text`` followed by [SEP], without [CLS] or padding (a FLAME facet prompt)."""
        return self._tok.encode(text, add_special_tokens=False).ids + [self.eot_id]

    @classmethod
    def train(cls, *args, **kwargs):
        raise TypeError("a pretrained encoder's tokenizer is fixed; build it with HFTokenizer.from_pretrained")


TOKENIZER_KINDS = {"bpe": BPETokenizer, "clip-bpe": ClipBPETokenizer, "hf": HFTokenizer}


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


def tokenizer_for_recipe(recipe) -> BPETokenizer:
    """A fresh run's tokenizer: the pretrained encoder's own (``model.text_tower = "hf"``), else a BPE
    trained on the data's captions."""
    if recipe.model.text_tower == "hf":
        return HFTokenizer.from_pretrained(recipe.model.text_pretrained, recipe.model.context_length)
    return train_tokenizer_for(recipe.data, recipe.model.context_length)
