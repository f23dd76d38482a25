import torch
import torch.nn.functional as F

from clipforge.eval.retrieval import retrieval_metrics, streaming_topk
from clipforge.eval.zeroshot import classification_metrics, zero_shot_classifier


def slow_retrieval(img, txt, text_to_image, ks=(1, 5, 10)):
    sims = (img @ txt.T).tolist()
    out = {}
    for k in ks:
        hits = 0
        for j in range(txt.shape[0]):
            col = [sims[i][j] for i in range(img.shape[0])]
            order = sorted(range(len(col)), key=lambda i: -col[i])[:k]
            hits += int(text_to_image[j].item() in order)
        out[f"image_retrieval_recall@{k}"] = hits / txt.shape[0]
        hits = 0
        for i in range(img.shape[0]):
            order = sorted(range(txt.shape[0]), key=lambda j: -sims[i][j])[:k]
            hits += int(any(text_to_image[j].item() == i for j in order))
        out[f"text_retrieval_recall@{k}"] = hits / img.shape[0]
    return out


def test_retrieval_equals_slow_reference_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(37, 16, generator=g, dtype=torch.float64), dim=-1)
    text_to_image = torch.cat([torch.arange(37), torch.randint(0, 37, (60,), generator=g)])
    txt = F.normalize(img[text_to_image] + 1.2 * torch.randn(97, 16, generator=g, dtype=torch.float64), dim=-1)
    expected = slow_retrieval(img, txt, text_to_image)
    for chunk in (5, 16, 4096):  # chunking must not change the answer
        got = retrieval_metrics(img, txt, text_to_image, chunk=chunk)
        assert got == expected
    assert 0 < expected["image_retrieval_recall@1"] < expected["image_retrieval_recall@10"] < 1


def test_streaming_topk_matches_full_topk():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(23, 8, generator=g), torch.randn(101, 8, generator=g)
    assert torch.equal(streaming_topk(q, k, 7, chunk=10), (q @ k.T).topk(7, dim=1).indices)


class _StubTextModel(torch.nn.Module):
    """encode_text returns a fixed random, *unnormalised* vector per prompt id."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(100, 12, generator=torch.Generator().manual_seed(2)) * 3)

    def encode_text(self, ids, mask):
        return self.table[ids[:, 0]]


class _StubTokenizer:
    def __init__(self):
        self.vocab = {}

    def __call__(self, texts):
        ids = torch.tensor([[self.vocab.setdefault(t, len(self.vocab))] for t in texts])
        return ids, torch.ones_like(ids)


def test_zero_shot_classifier_equals_the_formula():
    model, tok = _StubTextModel(), _StubTokenizer()
    classes, templates = ["red circle", "blue star", "green cross"], ["a {}.", "a photo of a {}.", "{} on white"]
    w = zero_shot_classifier(model, tok, classes, templates, batch_size=2)
    for c, name in enumerate(classes):
        per = torch.stack([F.normalize(model.table[tok.vocab[t.format(name)]], dim=0) for t in templates])
        expected = F.normalize(per.mean(0), dim=0)
        assert torch.allclose(w[c], expected, atol=1e-6)
        assert abs(w[c].norm().item() - 1) < 1e-6


def test_classification_metrics():
    logits = torch.tensor([[3.0, 2, 1, 0, -1, -2], [0, 3, 2, 1, 0, 0], [5, 4, 3, 2, 1, 0], [0, 0, 0, 0, 0, 9]])
    labels = torch.tensor([0, 2, 5, 5])
    m = classification_metrics(logits, labels, 6)
    assert m["acc1"] == 0.5 and m["acc5"] == 0.75
    assert m["mean_per_class_recall"] == (1 + 0 + 0.5) / 3


def test_fill_template_article_agreement():
    from clipforge.eval.zeroshot import fill_template

    assert fill_template("a photo of a {}.", "orange star") == "a photo of an orange star."
    assert fill_template("A {}", "apple") == "An apple"
    assert fill_template("a {}", "red circle") == "a red circle"
    assert fill_template("{} on a table", "egg") == "egg on a table"
