"""The caption BPE tokenizer: layout, truncation, round trip, save/load, determinism."""

import json

import pytest
import torch

from clipforge.config import DataConfig, ShapesConfig, TokenizerConfig
from clipforge.data.loader import caption_corpus_for
from clipforge.data.synthetic import ShapesDataset
from clipforge.models.tokenizer import BPETokenizer, load_tokenizer, train_tokenizer_for

CONTEXT = 16


@pytest.fixture(scope="module")
def corpus():
    return caption_corpus_for(DataConfig(), 500)


@pytest.fixture(scope="module")
def tok(corpus):
    return BPETokenizer.train(corpus, vocab_size=300, context_length=CONTEXT)


def test_layout_is_sot_tokens_eot_then_padding(tok):
    texts = ["a red circle", "a photo of a small blue star in the top left corner", "x"]
    ids, mask = tok(texts)
    assert ids.shape == mask.shape == (3, CONTEXT) and ids.dtype == mask.dtype == torch.long
    eot = mask.sum(1) - 1  # the pooling position the text tower uses
    for row in range(3):
        n = int(eot[row]) + 1
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
        assert ids[row, 0] == tok.sot_id and ids[row, n - 1] == tok.eot_id
        assert ids[row, n:].eq(tok.pad_id).all()
        assert tok.sot_id not in ids[row, 1 : n - 1] and tok.eot_id not in ids[row, 1 : n - 1]
    assert tok.pad_id == 0
    assert eot[0] < eot[1]  # longer caption, later EOT


def test_a_single_string_gives_one_row(tok):
    ids, mask = tok("a red circle")
    assert ids.shape == (1, CONTEXT)
    assert torch.equal(ids, tok(["a red circle"])[0])


def test_captions_round_trip_and_are_lower_cased(tok, corpus):
    ids, _ = tok(corpus[:200])
    assert [tok.decode(row) for row in ids] == corpus[:200]
    assert torch.equal(tok("A Photo of a RED Circle")[0], tok("a photo of a red circle")[0])
    # common caption words are single tokens: the merges were learned
    assert tok("a red circle")[1].sum() == 5


def test_words_outside_the_corpus_still_tokenize(tok):
    ids, mask = tok("Zebra,  4-ox!")
    real = ids[0, 1 : int(mask.sum()) - 1].tolist()
    assert tok.unk_id not in real
    assert tok.decode(ids[0]) == "zebra, 4-ox!"  # spaces and punctuation survive


def test_long_texts_are_truncated_with_eot_last(tok):
    text = " ".join(["a large green triangle left of"] * 10)
    ids, mask = tok([text, "a cross"])
    assert mask[0].eq(1).all()  # fills the whole context
    assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert text.startswith(tok.decode(ids[0]))
    assert mask[1].sum() == 4 and ids[1, 3] == tok.eot_id


def test_spec_save_and_load_give_identical_ids(tok, corpus, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == "tokenizer.json" and path.is_file()
    spec = json.loads(json.dumps(tok.spec()))  # JSON-able
    assert spec == {
        "kind": "bpe", "context_length": CONTEXT, "vocab_size": tok.vocab_size,
        "pad_id": 0, "sot_id": tok.sot_id, "eot_id": tok.eot_id,
    }
    for loaded in (BPETokenizer.load(path, CONTEXT), load_tokenizer(spec, tmp_path)):
        assert loaded.spec() == spec
        for a, b in zip(loaded(corpus[:100]), tok(corpus[:100])):
            assert torch.equal(a, b)
    shorter = BPETokenizer.load(tmp_path, 8)  # the context length is the caller's choice
    assert shorter("a red circle")[0].shape == (1, 8)


def test_load_errors_name_the_problem(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        BPETokenizer.load(tmp_path / "missing.json", CONTEXT)
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'clip'; known kinds: \['bpe', 'clip-bpe', 'hf'\]"):
        load_tokenizer({"kind": "clip", "context_length": CONTEXT}, tmp_path)
    tok.save(tmp_path)
    with pytest.raises(ValueError, match="vocab_size is"):
        load_tokenizer({**tok.spec(), "vocab_size": tok.vocab_size + 1}, tmp_path)
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer.train([], 100, CONTEXT)


def test_training_is_deterministic(tmp_path):
    data = DataConfig(tokenizer=TokenizerConfig(vocab_size=256, corpus_size=400))
    first = train_tokenizer_for(data, CONTEXT)
    second = train_tokenizer_for(data, CONTEXT)
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first.vocab_size <= 256


def test_every_caption_fits_the_demo_context():
    tok = train_tokenizer_for(DataConfig(tokenizer=TokenizerConfig(corpus_size=400)), 32)
    ds = ShapesDataset(ShapesConfig(two_objects_prob=1.0), 32, seed=0)
    _, mask = tok(ds.render_batch(range(300))[1])
    assert mask[:, -1].eq(0).all()  # nothing was cut at the recipe's context_length
