"""Hardening of search serving and index loading.

- no input gives a 5xx: lone surrogates (422 with a readable message), images of absurd aspect
  ratio (refused from the header, before any resize), decompression bombs in the index (422 at
  /image/{id}), and a seeded fuzz of a few hundred random requests;
- damaged or unsafe files (object-dtype .npy, truncated FAISS index) are refused with
  SearchIndexError / EmbedError naming the file and the command that rebuilds it, and the CLI
  exits 2 without a traceback;
- search by an indexed item (/similar/{id}), the query modes (/modes), and the search page:
  shareable ?q= / ?id= URLs, k, the modality, the query image, "1 result" / "2 results"
  (a headless Chromium test, marker ``browser``).
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from clipforge.index.dense import DenseIndex, SearchIndexError, build_index_dir  # noqa: E402
from clipforge.index.embed import EmbedError, load_embeddings  # noqa: E402
from clipforge.index.server import MAX_ASPECT_RATIO, MAX_K, create_app  # noqa: E402
from test_server import CHROMIUM, browser_or_skip, built, client, live_server  # noqa: E402,F401 (shared fixtures)

REPO = Path(__file__).resolve().parents[1]


def image_bytes(size=(40, 40), colour=(220, 30, 30), fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, format=fmt)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h RGB pixels but whose data is a few bytes: a decompression bomb
    as far as anything trusting the header is concerned."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def post_raw(client, body: bytes):
    return client.post("/search", content=body, headers={"content-type": "application/json"})


# ----------------------------------------------------------------------------- item 5a: lone surrogates
@pytest.mark.parametrize("body, where", [
    (b'{"text": "\\ud800"}', "text"),
    (b'{"text": "a red \\udfff circle", "k": 3}', "text"),
    (b'{"text": "ok", "k": "\\ud800"}', "k"),            # echoed back as the bad input
    (b'{"text": "ok", "\\ud800x": 1}', "a field name"),  # a field named by a lone surrogate
])
def test_lone_surrogates_in_json_get_a_readable_422(client, body, where):
    response = post_raw(client, body)  # on the old code the 422 handler itself raised UnicodeEncodeError
    assert response.status_code == 422, response.text
    response.content.decode("utf-8")  # the answer is valid UTF-8 JSON
    detail = response.json()["detail"]
    assert detail.startswith(f"{where}: ")
    if where != "k":  # k is a number: pydantic's own message says so
        assert "lone surrogate" in detail and "send UTF-8 text" in detail


def test_lone_surrogates_in_urls_get_a_4xx(client):
    # percent-encoded UTF-8 of U+D800 (invalid UTF-8) and the JSON-style escape as text
    for url in ("/image/%ED%A0%80", "/similar/%ED%A0%80", "/similar/1?k=%ED%A0%80", "/similar/1?k=%5Cud800",
                "/?q=%ED%A0%80", "/?q=%5Cud800"):
        response = client.get(url)
        assert response.status_code < 500, (url, response.text)
        if response.status_code == 422:
            assert response.json()["detail"]


# ----------------------------------------------------------------------------- item 5b: aspect ratio
@pytest.mark.parametrize("size", [(1, 20_000), (20_000, 1), (2, 2 * MAX_ASPECT_RATIO + 1)])
def test_absurd_aspect_ratios_are_refused_before_resizing(client, size):
    start = time.perf_counter()
    response = client.post("/search", json={"image": b64(image_bytes(size)), "k": 3})
    assert response.status_code == 422, response.text  # the old code answered 200 after a 32 x 640,000 resize
    assert f"{size[0]}x{size[1]} is more than {MAX_ASPECT_RATIO} times longer than it is wide" in response.json()["detail"]
    assert time.perf_counter() - start < 5


def test_long_but_sane_images_are_searched(client):
    for size in ((2, 2 * MAX_ASPECT_RATIO), (300, 20), (20, 300)):
        response = client.post("/search", json={"image": b64(image_bytes(size)), "k": 3})
        assert response.status_code == 200, (size, response.text)


def test_one_by_a_million_pixels_under_the_default_pixel_limit(built):
    # the case: 1 x 1,000,000 passes the 40 M pixel limit, and its resize used to take
    # 11 s and gigabytes before failing; now the header alone is enough to refuse it
    _, root = built
    client = TestClient(create_app(root / "idx"))
    start = time.perf_counter()
    response = client.post("/search", json={"image": b64(image_bytes((1, 1_000_000), fmt="PNG", mode="L"))})
    assert response.status_code == 422 and "times longer than it is wide" in response.json()["detail"]
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------------- item 5c: bombs in the index
@pytest.fixture
def bomb_client(built, tmp_path):
    """A copy of the index whose metadata points ids 2..5 at files claiming huge sizes (and id 6 at
    a file that is not an image)."""
    _, root = built
    shutil.copytree(root / "idx", tmp_path / "idx")
    files = {2: png_header(100_000, 100_000),  # over 2x Pillow's limit: DecompressionBombError
             3: png_header(10_000, 10_000),    # Pillow warns (DecompressionBombWarning), ours refuses
             4: png_header(7_000, 7_000),      # under Pillow's limit, over this server's 40 M
             5: png_header(1, 1_000_000),      # small, absurdly thin: its thumbnail is bounded anyway
             6: b"not an image"}
    meta = pq.read_table(tmp_path / "idx" / "metadata.parquet").to_pydict()
    for item_id, data in files.items():
        path = tmp_path / f"bomb_{item_id}.png"
        path.write_bytes(data)
        meta["image"][meta["id"].index(item_id)] = str(path)
    pq.write_table(pa.table(meta), tmp_path / "idx" / "metadata.parquet")
    return TestClient(create_app(tmp_path / "idx"))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own log line for id 3
def test_decompression_bombs_at_image_endpoint_get_422(bomb_client):
    for item_id in (2, 3, 4):
        start = time.perf_counter()
        response = bomb_client.get(f"/image/{item_id}")  # the old code raised DecompressionBombError: 500
        assert response.status_code == 422, (item_id, response.text)
        assert f"image {item_id} is too large to decode" in response.json()["detail"]
        assert time.perf_counter() - start < 5
    thin = bomb_client.get("/image/5")  # the truncated data fails to decode: 404, never 500
    assert thin.status_code in (200, 404), thin.text
    broken = bomb_client.get("/image/6")
    assert broken.status_code == 404 and "cannot be read" in broken.json()["detail"]
    assert bomb_client.get("/image/7").status_code == 200  # the others are untouched


def test_upload_bombs_are_refused_from_the_header(client):
    for data in (png_header(100_000, 100_000), png_header(600, 600)):
        response = client.post("/search", json={"image": b64(data)})
        assert response.status_code == 422, response.text


# ----------------------------------------------------------------------------- item 5: fuzz
TEXT_POOLS = [
    "abcdefghijklmnopqrstuvwxyz     ",
    "".join(chr(c) for c in range(0, 32)) + "\x7f\x85\u2028\u2029",  # controls, NUL, line separators
    "\ud800\udbff\udc00\udfff",                                        # lone surrogates
    "é漢字한국어العربيةעברית\u200f\u202e\ufeff\u0301\u20dd😀👩‍👩‍👧🏳️‍🌈",  # RTL, BOM, combining, emoji
    "\"\\/{}[]<>&'%+?#=",
]


def random_text(rng: random.Random) -> str:
    length = rng.choice([0, 1, 2, 5, 20, 200, 999, 1000, 1001, 3000])
    pool = "".join(rng.sample(TEXT_POOLS, rng.randint(1, len(TEXT_POOLS))))
    return "".join(rng.choice(pool) for _ in range(length))


def random_image(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.08:
        return rng.randbytes(rng.choice([0, 1, 8, 100, 5000]))
    if kind < 0.14:
        return png_header(rng.choice([0, 1, 7, 600, 70_000, 2**31 - 1]), rng.choice([0, 1, 3, 600, 70_000]))
    fmt, modes = rng.choice([("PNG", ["1", "L", "P", "RGB", "RGBA", "LA", "I", "I;16"]), ("JPEG", ["L", "RGB", "CMYK"]),
                             ("GIF", ["L", "P"]), ("BMP", ["1", "L", "RGB"]), ("WEBP", ["RGB", "RGBA"]), ("ICO", ["RGBA"]),
                             ("TIFF", ["1", "L", "RGB", "CMYK", "F", "I;16"])])
    w, h = rng.choice([(1, 1), (1, 40), (2, 65), (65, 2), (1, 3000), (3, 90), (90, 3), (33, 17), (64, 64), (499, 501),
                       (8, 8), (40, 48), (17, 3), (200, 7)])
    mode = rng.choice(modes)
    pixels = np.frombuffer(rng.randbytes(w * h), dtype=np.uint8).reshape(h, w)
    image = Image.fromarray(pixels, "L").convert(mode) if mode not in ("I;16",) else Image.new(mode, (w, h), 7)
    buf = io.BytesIO()
    try:
        image.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        image.convert("RGB").save(buf, format="PNG")
    raw = buf.getvalue()
    if rng.random() < 0.15:  # truncated or bit-flipped
        raw = bytearray(raw[: rng.randint(0, len(raw))])
        for _ in range(rng.randint(0, 4)):
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        raw = bytes(raw)
    return raw


def random_value(rng: random.Random, depth: int = 0):
    choice = rng.randrange(9 if depth < 2 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 3, 16, 100, 101, 2**31, -(2**63), 2**64, 10**30])
    if choice == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 1e-320, 3.0])
    if choice == 4:
        return random_text(rng)
    if choice == 5:
        return ""
    if choice == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 16, 17]))]
    if choice == 7:
        return {random_text(rng)[:10]: random_value(rng, depth + 1)}
    return [rng.uniform(-1, 1) for _ in range(16)]


def random_search_body(rng: random.Random) -> bytes:
    body: dict = {}
    roll = rng.random()  # mostly one query field (so images reach the decoder), sometimes any mix
    fields = (["image"] if roll < 0.4 else ["text"] if roll < 0.6 else ["embedding"] if roll < 0.7
              else rng.sample(["text", "image", "embedding", "k", "extra"], rng.randint(0, 3)))
    if roll < 0.7 and rng.random() < 0.5:
        fields.append("k")
    for field in fields:
        if field == "text":
            body["text"] = random_text(rng) if rng.random() < 0.8 else random_value(rng)
        elif field == "image":
            raw = random_image(rng)
            body["image"] = rng.choice([b64(raw)] * 4 + ["data:image/png;base64," + b64(raw)] * 3 +
                                       ["data:x," + b64(raw), b64(raw)[:-1], random_text(rng)])
        elif field == "embedding":
            body["embedding"] = rng.choice([
                [rng.gauss(0, 1) for _ in range(16)], [0.0] * 16, [1e38] * 16, [1e-45] * 16, [float("nan")] * 16,
                [float("inf")] + [0.0] * 15, [1.0] * rng.choice([0, 1, 15, 17, 9000]), random_value(rng)])
        elif field == "k":
            roll_k = rng.random()  # mostly a valid k, so the query itself is exercised
            body["k"] = random_value(rng) if roll_k < 0.2 else rng.randint(-5, 130) if roll_k < 0.4 else rng.randint(1, 30)
        else:
            body[random_text(rng)[:12] or "x"] = random_value(rng)
    # ensure_ascii: surrogates and NaN travel as JSON escapes / tokens, as a hostile client would send them
    text = json.dumps(body if rng.random() < 0.95 else random_value(rng))
    if rng.random() < 0.1:
        text = text[: rng.randint(0, len(text))]  # truncated JSON
    return text.encode()


def url_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate as the (invalid) UTF-8 a raw client sends


def random_path_token(rng: random.Random) -> str:
    return rng.choice([str(rng.randint(0, 30)), str(rng.randint(-5, 5)), str(10**rng.randint(5, 40)), "1.5", "0x10",
                       "", "%00", quote(rng.randbytes(rng.randint(1, 6))), quote(url_bytes(random_text(rng)[:20]), safe="")])


def fuzz_request(client, rng: random.Random):
    kind = rng.random()
    if kind < 0.55:
        return post_raw(client, random_search_body(rng))
    if kind < 0.65:
        raw = rng.choice([rng.randbytes(rng.randint(0, 300)), b"[" * 5000 + b"]" * 5000, b"\xff\xfe{}", b"null",
                          b'{"text": "a"}' * 2, b"\x00" * 10])
        headers = {"content-type": rng.choice(["application/json", "text/plain", "multipart/form-data",
                                                "application/x-www-form-urlencoded"])}
        return client.post("/search", content=raw, headers=headers)
    if kind < 0.75:
        return client.get(f"/image/{random_path_token(rng)}")
    if kind < 0.9:
        query = urlencode({"k": rng.choice([str(rng.randint(-3, 130)), url_bytes(random_text(rng)[:10]), "", "1e3"])})
        return client.get(f"/similar/{random_path_token(rng)}?{query}")
    return client.get(rng.choice(["/", "/health", "/modes"]) + "?" + urlencode({"q": url_bytes(random_text(rng)[:50])}))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt files it is fed
def test_fuzzed_requests_never_get_a_5xx(client):
    rng = random.Random(20240611)
    start = time.perf_counter()
    statuses: dict[int, int] = {}
    for i in range(500):
        response = fuzz_request(client, rng)  # TestClient re-raises any exception inside the app
        assert response.status_code < 500, (i, response.status_code, response.text[:500])
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 400 and response.headers.get("content-type", "").startswith("application/json"):
            response.content.decode("utf-8")
            assert response.json()["detail"], response.text
    assert statuses.get(200, 0) > 20 and statuses.get(422, 0) > 100, statuses  # both paths were exercised
    assert time.perf_counter() - start < 60


# ----------------------------------------------------------------------------- item 6: damaged files
@pytest.fixture
def emb_copy(built, tmp_path):
    _, root = built
    shutil.copytree(root / "emb", tmp_path / "emb")
    return tmp_path / "emb"


@pytest.fixture
def idx_copy(built, tmp_path):
    _, root = built
    shutil.copytree(root / "idx", tmp_path / "idx")
    return tmp_path / "idx"


def object_npy(path: Path) -> None:
    np.save(path, np.array([{"not": "a vector"}, None], dtype=object), allow_pickle=True)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_object_dtype_embedding_shard_is_refused_as_unsafe(emb_copy):
    object_npy(emb_copy / "images" / "shard_00000.npy")
    with pytest.raises(EmbedError, match=r"shard_00000\.npy holds pickled Python objects.*unsafe.*clipforge embed"):
        load_embeddings(emb_copy)


def test_truncated_or_misshapen_embedding_shard(emb_copy):
    shard = emb_copy / "images" / "shard_00000.npy"
    truncate(shard)
    with pytest.raises(EmbedError, match=r"shard_00000\.npy is damaged or truncated.*clipforge embed"):
        load_embeddings(emb_copy)
    np.save(shard, np.arange(5))
    with pytest.raises(EmbedError, match=r"not an N x E float array"):
        load_embeddings(emb_copy)
    (emb_copy / "manifest.json").write_text("{not json")
    with pytest.raises(EmbedError, match=r"manifest\.json is damaged"):
        load_embeddings(emb_copy)


def test_object_dtype_ids_are_refused_as_unsafe(idx_copy):
    object_npy(idx_copy / "ids.npy")
    with pytest.raises(SearchIndexError, match=r"ids\.npy holds pickled Python objects.*unsafe.*clipforge index"):
        DenseIndex(idx_copy)
    with pytest.raises(SearchIndexError, match="pickled"):
        create_app(idx_copy)  # the server refuses it the same way
    np.save(idx_copy / "ids.npy", np.arange(3))
    with pytest.raises(SearchIndexError, match=r"not 24 integer ids"):
        DenseIndex(idx_copy)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_faiss_index_is_refused(idx_copy, keep):
    truncate(idx_copy / "index.faiss", keep)
    with pytest.raises(SearchIndexError, match=r"index\.faiss is damaged or truncated.*clipforge index"):
        DenseIndex(idx_copy)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180)


def test_cli_exits_2_without_a_traceback(emb_copy, idx_copy, tmp_path):
    object_npy(emb_copy / "images" / "shard_00001.npy")
    out = cli("index", str(emb_copy), "--out", str(tmp_path / "new_idx"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "pickled Python objects" in out.stderr and "clipforge embed" in out.stderr

    truncate(idx_copy / "index.faiss")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = cli("serve", str(idx_copy), "--port", str(port))  # refused while loading, before it binds
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "damaged or truncated" in out.stderr and "clipforge index" in out.stderr


# ----------------------------------------------------------------------------- item 16: search by item, modes
def test_similar_searches_by_the_stored_vector(built, client):
    _, root = built
    vectors, table, _ = load_embeddings(root / "emb")
    ids = table.column("id").to_pylist()
    body = client.get("/similar/7?k=5").json()
    assert body["query"] == "item" and body["k"] == 5 and len(body["results"]) == 5
    assert body["item"] == {"id": 7, "caption": table.column("caption").to_pylist()[ids.index(7)], "image_url": "/image/7"}
    assert body["results"][0]["id"] == 7 and body["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    same = client.post("/search", json={"embedding": vectors[ids.index(7)].tolist(), "k": 5}).json()
    assert [r["id"] for r in body["results"]] == [r["id"] for r in same["results"]]
    missing = client.get("/similar/999")
    assert missing.status_code == 404 and "no indexed item with id 999" in missing.json()["detail"]
    assert client.get(f"/similar/1?k={MAX_K + 1}").json()["detail"] == f"k: Input should be less than or equal to {MAX_K}"
    assert client.get("/similar/-1").status_code == 422
    assert client.get(f"/similar/{2**70}").status_code == 422


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_stored_vectors_of_approximate_indexes(built, tmp_path, kind):
    _, root = built
    build_index_dir(root / "emb", tmp_path / "idx", kind=kind, nlist=2)
    vectors, table, _ = load_embeddings(root / "emb")
    index = DenseIndex(tmp_path / "idx")
    ids = table.column("id").to_pylist()
    for item_id in (0, 11, 23):
        np.testing.assert_allclose(index.vector(item_id), vectors[ids.index(item_id)], atol=1e-6)
    assert index.vector(24) is None and index.vector(-1) is None and index.vector(2**70) is None


def test_modes_say_what_the_server_can_answer(built, client, tmp_path):
    _, root = built
    assert client.get("/modes").json() == {"what": "images", "model": True, "modes": [
        {"query": "text", "label": "text → image"}, {"query": "image", "label": "image → image"},
        {"query": "item", "label": "indexed image → image"}]}
    build_index_dir(root / "emb", tmp_path / "texts", kind="flat", what="texts")
    texts = TestClient(create_app(tmp_path / "texts")).get("/modes").json()
    assert [m["label"] for m in texts["modes"]] == ["text → text", "image → text", "indexed text → text"]
    # a model that is gone: embedding and item queries only (a missing --ckpt is refused instead)
    gone = shutil.copytree(root / "idx", tmp_path / "gone")
    info = json.loads((gone / "index.json").read_text())
    (gone / "index.json").write_text(json.dumps({**info, "checkpoint": str(tmp_path / "missing")}))
    with pytest.warns(UserWarning, match="which is not there any more: text and image queries are off"):
        no_model = TestClient(create_app(gone))
    assert no_model.get("/modes").json()["modes"] == [{"query": "item", "label": "indexed image → image"}]
    assert no_model.get("/similar/3?k=2").status_code == 200  # needs no model


# ----------------------------------------------------------------------------- item 16: the page in Chromium
def status_is(page, pattern: str) -> None:
    page.wait_for_function(f"/{pattern}/.test(document.getElementById('status').textContent)", timeout=15_000)


@pytest.mark.browser
def test_search_page_urls_k_modes_and_search_by_image(live_server, tmp_path):
    sync_api, shots = browser_or_skip(tmp_path)
    upload = tmp_path / "query.png"
    upload.write_bytes(image_bytes((40, 40), (30, 180, 60)))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # a shared URL runs its search
            page.goto(live_server + "/?q=red+circle")
            status_is(page, r"^24 results for a text query \(text → image\) in")
            assert page.input_value("#query") == "red circle"
            assert page.locator("#results .result").count() == 24
            assert page.locator("#query-view").is_hidden()
            # the modes offered are the server's, labelled source → target
            assert page.locator("#mode option").all_inner_texts() == ["text → image", "image → image"]

            # k: one result, in the singular; the URL follows
            page.fill("#k", "1")
            page.dispatch_event("#k", "change")
            status_is(page, r"^1 result for a text query")
            assert page.locator("#results .result").count() == 1
            assert page.evaluate("location.search") == "?q=red+circle&k=1"

            page.fill("#k", "2")
            page.fill("#query", "a green square")
            page.press("#query", "Enter")
            status_is(page, r"^2 results for a text query")
            assert page.evaluate("location.search") == "?q=a+green+square&k=2"

            # click a result: search by that image; the query image is shown
            first = page.locator("#results .result").first
            clicked = first.get_attribute("data-id")
            first.click()
            status_is(page, rf"^2 results for indexed image #{clicked} \(indexed image → image\)")
            assert page.evaluate("location.search") == f"?id={clicked}&k=2"
            assert page.locator("#query-view").is_visible()
            assert page.get_attribute("#query-image", "src") == f"/image/{clicked}"
            assert page.locator("#results .result").first.get_attribute("data-id") == clicked  # itself, score 1
            page.wait_for_function("document.getElementById('query-image').naturalWidth > 0")

            # image → image by upload: the uploaded image is shown as the query
            page.select_option("#mode", "image")
            assert page.locator("#query").is_hidden() and page.locator("#drop").is_visible()
            page.set_input_files("#file", str(upload))
            status_is(page, r"^2 results for an image query \(image → image\)")
            assert page.get_attribute("#query-image", "src").startswith("data:image/png;base64,")
            assert "query.png" in page.inner_text("#query-view")
            assert page.evaluate("location.search") == "?k=2"  # an upload has no URL of its own
            page.screenshot(path=str(shots / "search-by-image.png"), full_page=True)

            # a shared ?id= URL runs the search by that item
            page.goto(live_server + "/?id=3&k=3")
            status_is(page, r"^3 results for indexed image #3 ")
            assert page.input_value("#k") == "3"
            page.wait_for_function("document.getElementById('query-caption').textContent.includes('#3: a ')")
            assert errors == []
        finally:
            browser.close()


# ----------------------------------------------------------------------------- serve: arguments checked at start
@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_before_printing_a_url(built, capsys, monkeypatch, port):
    from tiny_checkpoint import run_cli

    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    _, root = built
    code, out, err = run_cli(capsys, "serve", root / "idx", "--port", port)
    assert code == 2 and "Traceback" not in out + err and "http://" not in out, out + err
    assert f"--port must be between 1 and 65535, got {port}" in " ".join(err.split())


def test_serve_refuses_a_missing_ckpt_instead_of_starting_without_a_model(built, capsys, monkeypatch, tmp_path):
    from tiny_checkpoint import run_cli

    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("the server started"))
    ckpt, root = built
    code, out, err = run_cli(capsys, "serve", root / "idx", "--ckpt", tmp_path / "nonexist")
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in out + err and "http://" not in out, out + err
    assert f"--ckpt {tmp_path / 'nonexist'}: no checkpoint there" in err and str(ckpt.resolve()) in err


def test_serve_warns_when_ckpt_is_another_model_than_the_index_was_embedded_with(built, tmp_path):
    from tiny_checkpoint import make_tiny_checkpoint

    ckpt, root = built
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.warns(UserWarning, match="is not the checkpoint the index was embedded with"):
        create_app(root / "idx", other)
    copy = shutil.copytree(ckpt, tmp_path / "copy")  # the same weights elsewhere: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_app(root / "idx", copy)
        create_app(root / "idx", ckpt)
