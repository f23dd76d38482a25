"""The one embedding loop (clipforge.eval.embedding): chunking, rank sharding, skipped images, callers."""

import pytest
import torch
from PIL import Image

from clipforge.config import ModelConfig
from clipforge.eval.embedding import (
    chunk_ranges,
    embed_batches,
    embed_captions,
    embed_images,
    embed_texts,
    num_rounds,
    put_in_order,
)
from clipforge.models.clip import CLIP
from tiny_checkpoint import TINY_MODEL


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CLIP(ModelConfig(**TINY_MODEL)).eval()


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def random_ids(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (n, 16), generator=g)
    lengths = torch.randint(2, 17, (n,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    return ids * mask, mask


class CountingTokenizer:
    """Word -> id, padded to 16; counts the calls (one per chunk)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        ids = torch.zeros(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [3 + sum(map(ord, w)) % 190 for w in text.split()][:16]
            ids[row, : len(words)] = torch.tensor(words)
        return ids, (ids > 0).long()


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_chunked_embeddings_equal_a_direct_encode(model, batch_size):
    images = random_images(13)
    ids, mask = random_ids(11)
    with torch.no_grad():
        direct_images = model.encode_image(images)
        direct_texts = model.encode_text(ids, mask)
        direct_tokens = model.encode_image_tokens(images)
        direct_text_tokens = model.encode_text_tokens(ids, mask)
    got = embed_images(model, images, batch_size=batch_size)
    assert got.dtype == torch.float32 and got.shape == direct_images.shape and not got.requires_grad
    assert torch.allclose(got, direct_images, atol=1e-5)
    assert torch.allclose(embed_texts(model, ids, mask, batch_size=batch_size), direct_texts, atol=1e-5)
    assert torch.allclose(embed_images(model, images, batch_size=batch_size, tokens=True), direct_tokens, atol=1e-5)
    assert torch.allclose(embed_texts(model, ids, mask, batch_size=batch_size, tokens=True), direct_text_tokens,
                          atol=1e-5)
    # an iterable of batches (a DataLoader, decoded files) gives the same rows; empty batches are skipped
    batches = [images[:5], images[5:5], images[5:]]
    assert torch.allclose(embed_images(model, iter(batches), out_device="cpu"), direct_images, atol=1e-5)


def test_captions_are_tokenized_and_embedded_chunk_by_chunk(model):
    texts = [f"a red circle number {i}" for i in range(10)]
    tokenizer = CountingTokenizer()
    advanced = []
    got = embed_captions(model, tokenizer, texts, batch_size=4, advance=advanced.append)
    assert tokenizer.calls == 3 and advanced == [4, 4, 2]
    with torch.no_grad():
        expected = model.encode_text(*CountingTokenizer()(texts))
    assert torch.allclose(got, expected, atol=1e-5)
    assert embed_captions(model, tokenizer, []).shape == (0, TINY_MODEL["embed_dim"])


def test_rank_chunks_tile_the_items_round_robin():
    assert [list(r) for r in chunk_ranges(10, 3, rank=1, world_size=2)] == [[3, 4, 5], [9]]
    for n, bs, world in [(10, 3, 2), (7, 7, 3), (25, 4, 4), (1, 5, 2)]:
        every = sorted(i for rank in range(world) for r in chunk_ranges(n, bs, rank, world) for i in r)
        assert every == list(range(n))
        assert num_rounds(n, bs, world) == max(len(chunk_ranges(n, bs, rank, world)) for rank in range(world))
    with pytest.raises(ValueError, match="rank must be in"):
        chunk_ranges(10, 3, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_sharded_embeddings_reassemble_to_the_single_process_result(model, world_size):
    n, batch_size = 10, 4  # 3 chunks: with 4 ranks, rank 3 holds none and runs a padding pass
    images, (ids, mask) = random_images(n, seed=1), random_ids(n, seed=1)
    labels = torch.arange(n) * 7

    def batch_of(idx):
        return {"images": images[idx], "input_ids": ids[idx], "attention_mask": mask[idx], "labels": labels[idx]}

    single = embed_batches(model, batch_of, n, batch_size, keep=("labels",))
    assert torch.equal(single["index"], torch.arange(n)) and torch.equal(single["labels"], labels)
    with torch.no_grad():
        assert torch.allclose(single["images"], model.encode_image(images), atol=1e-5)

    calls = []
    original = model.encode_image
    model.encode_image = lambda x: calls.append(len(x)) or original(x)
    try:
        parts = [embed_batches(model, batch_of, n, batch_size, keep=("labels",), rank=r, world_size=world_size)
                 for r in range(world_size)]
    finally:
        del model.encode_image
    # FSDP needs every rank in every forward: each rank runs as many passes as the busiest one
    assert len(calls) == world_size * num_rounds(n, batch_size, world_size)
    for key in ("images", "texts", "labels"):
        whole = put_in_order([p[key] for p in parts], [p["index"] for p in parts], n)
        assert torch.equal(whole, single[key]), key  # the same batches embed bitwise alike
    assert sum(len(p["index"]) for p in parts) == n  # padding passes keep no rows


def test_put_in_order_skips_padding_rows():
    parts = [torch.tensor([[0.0], [2.0], [9.0]]), torch.tensor([[1.0], [3.0], [9.0]])]
    indices = [torch.tensor([0, 2, -1]), torch.tensor([1, 3, -1])]
    assert put_in_order(parts, indices, 4).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_decoded_files_skip_unreadable_images_and_keep_the_ok_mask(model, tmp_path):
    from clipforge.data.transforms import EvalPreprocess
    from clipforge.eval.datasets import DecodedImages, embed_image_files

    images = iter(random_images(5, seed=2))
    paths = [tmp_path / f"{i}.png" for i in range(7)]
    for i, path in enumerate(paths):
        if i in (1, 4):
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(next(images).permute(1, 2, 0).numpy()).save(path)
    preprocess = EvalPreprocess(32)
    decoded = DecodedImages(paths, preprocess, 32, batch_size=2)
    got = embed_images(model, decoded)
    assert decoded.ok.tolist() == [True, False, True, True, False, True, True]
    assert [p for p, _ in decoded.bad] == [str(paths[1]), str(paths[4])]
    good = torch.stack([preprocess(Image.open(p)) for p, ok in zip(paths, decoded.ok) if ok])
    with torch.no_grad():
        assert torch.allclose(got, model.encode_image(good), atol=1e-5)
    result = embed_image_files(model, paths, preprocess, batch_size=3, max_bad_fraction=0.5, progress=False)
    assert torch.allclose(result.embeds, got, atol=1e-5) and result.embeds.device.type == "cpu"
    assert len(result.bad) == 2


def test_shapes_eval_split_embeddings_match_a_direct_encode(model):
    from clipforge.config import DataConfig, ShapesConfig
    from clipforge.data.loader import build_eval_set
    from clipforge.eval.hooks import embed_split

    dataset = build_eval_set(DataConfig(shapes=ShapesConfig(eval_samples_per_class=1)), 32, "seen")
    tokenizer = CountingTokenizer()
    img, txt, labels = embed_split(model, tokenizer, dataset, batch_size=16)
    images, captions, expected_labels = dataset.render_batch(range(len(dataset)))
    with torch.no_grad():
        assert torch.allclose(img, model.encode_image(images), atol=1e-5)
        assert torch.allclose(txt, model.encode_text(*CountingTokenizer()(captions)), atol=1e-5)
    assert torch.equal(labels, expected_labels)
