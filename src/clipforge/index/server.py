"""The search server: a small FastAPI app over an index directory.

    clipforge serve idx/ --port 8000      # http://127.0.0.1:8000/ (page), /docs and /openapi.json (schema)

    POST /search       {"text": "..."} | {"image": "<base64 or data: URL>"} | {"embedding": [...]}, "k": 10
                       -> {"query": "text", "k": 10, "results": [{"id", "score", "caption", "image_url"}], "took_ms"}
    GET  /similar/{id} ?k=10: search by the stored vector of an indexed item (image -> image in an image index)
    GET  /image/{id}   a JPEG thumbnail of an indexed image (only those: ids, never paths, come in)
    GET  /health       index kind, size, dimension
    GET  /modes        which query modes this server can answer (text needs a model), with labels

Safe by default: binds 127.0.0.1, refuses request bodies over ``max_request_bytes`` (413), decodes
at most ``max_image_pixels`` pixels, refuses images longer than ``MAX_ASPECT_RATIO``:1 (whose resize
would be huge), and answers every malformed field with 422 and a message: no input gives a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import threading
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_K = 100
MAX_TEXT_CHARS = 1000
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_IMAGE_BASE64_CHARS = MAX_REQUEST_BYTES  # the body limit applies first; this names the field in errors
MAX_IMAGE_PIXELS = 40_000_000  # ~ 6300 x 6300; larger uploads are refused before decoding
MAX_ASPECT_RATIO = 32  # longer side / shorter side; beyond it the shorter-side resize makes a huge strip
MAX_EMBED_DIM = 8192
MAX_ITEM_ID = 2**63 - 1  # ids are int64 in the index
THUMBNAIL_SIZE = 256


class ServerError(ValueError):
    """A server that cannot start as asked; the message says what to do."""


def require_server_deps():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServerError("serving needs fastapi and uvicorn: pip install 'clipforge[index]'") from None


# ----------------------------------------------------------------------------- API schema
class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``image`` or ``embedding``, and how many results."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS, description="A text query.")
    image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_BASE64_CHARS,
                              description="An image: base64 bytes of a PNG/JPEG/..., or a data: URL.")
    embedding: list[float] | None = Field(None, min_length=1, max_length=MAX_EMBED_DIM,
                                          description="A query vector of the index's dimension (normalised here).")
    k: int = Field(10, ge=1, le=MAX_K, description=f"Number of results (1..{MAX_K}).")

    @model_validator(mode="after")
    def _exactly_one_query(self) -> "SearchRequest":
        given = [name for name in ("text", "image", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image or embedding (got {', '.join(given) or 'none'})")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is blank")
        return self


class Word(BaseModel):
    word: str
    weight: float


class Hit(BaseModel):
    id: int
    score: float
    caption: str
    image_url: str | None
    words: list[Word] | None = None  # lexical index: the result's top weighted words


class SearchResponse(BaseModel):
    query: Literal["text", "image", "embedding", "item"]
    k: int
    results: list[Hit]
    took_ms: float
    query_words: list[Word] | None = None  # lexical index: the query's top weighted words


class Item(BaseModel):
    id: int
    caption: str
    image_url: str | None


class SimilarResponse(SearchResponse):
    item: Item = Field(description="The indexed item searched by (its stored vector is the query).")


class Mode(BaseModel):
    query: Literal["text", "image", "item"]
    label: str


class Modes(BaseModel):
    what: str
    model: bool
    modes: list[Mode]


class Health(BaseModel):
    kind: str
    what: str
    count: int
    dim: int


# ----------------------------------------------------------------------------- helpers
class QueryError(ValueError):
    """A well-formed request whose content cannot be used (bad image, wrong dimension): 422."""


def check_image_size(w: int, h: int, max_pixels: int, name: str = "image") -> None:
    """Refuse, from the header alone, images whose decoding or resizing would be unbounded."""
    if w < 1 or h < 1:
        raise QueryError(f"{name}: {w}x{h} has no pixels")
    if w * h > max_pixels:
        raise QueryError(f"{name}: {w}x{h} is more than {max_pixels} pixels; send a smaller image")
    # the model resizes the shorter side up or down to its input size, so a 1 x 1,000,000 strip would
    # become 224 x 224,000,000: the output, not only the input, has to be bounded
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise QueryError(f"{name}: {w}x{h} is more than {MAX_ASPECT_RATIO} times longer than it is wide; "
                         "crop it to the part to search for")


def decode_image(data: str, max_pixels: int = MAX_IMAGE_PIXELS, size_hint: int | None = None):
    """base64 (or a data: URL) -> RGB PIL image; every failure is a QueryError with a message.

    ``size_hint`` (the model's input size) lets a JPEG decode at 1/2 .. 1/8 scale when the model
    would throw that resolution away anyway."""
    from PIL import Image, ImageOps

    from clipforge.data.transforms import to_rgb

    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise QueryError("image: a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError("image: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            check_image_size(*image.size, max_pixels)
            if size_hint and image.format == "JPEG":
                image.draft("RGB", (size_hint, size_hint))  # keeps both sides >= size_hint
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
            check_image_size(*image.size, max_pixels)  # EXIF may swap sides; draft only shrinks
            return image
    except QueryError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise QueryError(f"image: cannot be decoded ({type(e).__name__})") from None


def unit_vector(values: list[float], dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.shape != (dim,):
        raise QueryError(f"embedding: expected {dim} numbers (the index's dimension), got {v.size}")
    if not np.isfinite(v).all() or not v.any():
        raise QueryError("embedding: must be finite and not all zero")
    v = v / np.abs(v).max()  # first to <= 1, so the norm of huge (finite) values does not overflow
    return v / np.linalg.norm(v)


def query_checkpoint(given: str | Path | None, recorded: str | None) -> Path | None:
    """The model for text and image queries: ``given`` (--ckpt; must exist) or the one the index was embedded
    with (``recorded``; None when it is gone: embedding queries only). A given checkpoint that is not the
    recorded one (another directory with other weights) is warned about: its queries land elsewhere."""
    import warnings

    if given is None:
        if recorded and not Path(recorded).exists():
            warnings.warn(f"the index was embedded with {recorded}, which is not there any more: text and image "
                          "queries are off; pass --ckpt with that model to turn them on")
            return None
        return Path(recorded) if recorded else None
    given = Path(given)
    if not (given / "config.json").is_file():
        raise ServerError(f"--ckpt {given}: no checkpoint there (config.json missing); pass the checkpoint the index "
                          "was embedded with, or leave --ckpt out to use the one the index records"
                          + (f" ({recorded})" if recorded else ""))
    if recorded and not same_weights(given, Path(recorded)):
        warnings.warn(f"--ckpt {given} is not the checkpoint the index was embedded with ({recorded}"
                      f"{'' if Path(recorded).exists() else ', gone'}): text and image queries are embedded by "
                      "another model and will not match the indexed vectors unless the weights are the same")
    return given


def same_weights(a: Path, b: Path) -> bool:
    """One checkpoint directory, or two whose weight files are byte for byte equal (a copy)."""
    import filecmp

    from clipforge.train.checkpoint import WEIGHTS

    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return True
    wa, wb = a / WEIGHTS, b / WEIGHTS
    return wa.is_file() and wb.is_file() and filecmp.cmp(wa, wb, shallow=False)


class Searcher:
    """The index, its metadata and (for text and image queries) the model, behind one ``search``."""

    def __init__(self, index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        import pyarrow.parquet as pq

        from clipforge.index.dense import META_FILE, REBUILD, SearchIndexError
        from clipforge.index.lexical import open_index

        self.index = open_index(index_dir)  # a DenseIndex, or a LexicalIndex (kind "lexical")
        self.lexical = self.index.info.get("kind") == "lexical"
        try:
            meta = pq.read_table(Path(index_dir) / META_FILE).to_pydict()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise SearchIndexError(f"{Path(index_dir) / META_FILE} is missing or damaged ({str(e)[:160]}); "
                                   f"{REBUILD}") from None
        self.captions = dict(zip(meta["id"], meta.get("caption", [""] * len(meta["id"]))))
        self.images = dict(zip(meta["id"], meta["image"])) if "image" in meta else {}
        checkpoint = query_checkpoint(checkpoint, self.index.info.get("checkpoint"))
        self.model = self.preprocess = self.tokenizer = None
        if checkpoint is not None:
            from clipforge.api import load

            self.model, self.preprocess, self.tokenizer = load(checkpoint, device=device)
            if self.lexical:
                from clipforge.index.lexical import SparseEncoder

                self.model = SparseEncoder(self.model)  # queries become top-k vocabulary weights
            if self.model.cfg.embed_dim != self.index.dim:
                raise ServerError(f"checkpoint {checkpoint} embeds into {self.model.cfg.embed_dim} dimensions but "
                                  f"the index has {self.index.dim}; pass the checkpoint the index was built with")
        self.max_image_pixels = max_image_pixels
        self._lock = threading.Lock()  # one model call at a time: CPU threads are already all in use

    def embed_query(self, request: SearchRequest) -> np.ndarray:
        import torch

        if request.embedding is not None:
            return unit_vector(request.embedding, self.index.dim)
        size_hint = self.model.cfg.image_size if self.model is not None else None
        image = decode_image(request.image, self.max_image_pixels, size_hint) if request.image is not None else None
        if self.model is None:
            raise QueryError("this server has no model loaded (start it with --ckpt); only embedding queries and "
                             "searches by an indexed item (GET /similar/{id}) work")
        with self._lock, torch.inference_mode():
            if request.text is not None:
                ids, mask = self.tokenizer([request.text])
                vector = self.model.encode_text(ids, mask)
            else:
                vector = self.model.encode_image(self.preprocess(image)[None])
        return vector[0].float().cpu().numpy()

    def search(self, request: SearchRequest) -> SearchResponse:
        start = time.perf_counter()
        query = self.embed_query(request)
        kind = "text" if request.text is not None else "image" if request.image is not None else "embedding"
        return SearchResponse(query=kind, k=request.k, results=self.hits(query, request.k),
                              took_ms=round(1000 * (time.perf_counter() - start), 3), query_words=self.words(query))

    def words(self, vector: np.ndarray) -> list[Word] | None:
        """A lexical vector's top weighted words (what it means, readable); None for a dense index."""
        if not self.lexical:
            return None
        return [Word(word=w, weight=x) for w, x in self.index.top_words(vector)]

    def similar(self, item_id: int, k: int) -> SimilarResponse | None:
        """Search by the stored vector of an indexed item (None if ``item_id`` is not indexed)."""
        start = time.perf_counter()
        query = self.index.vector(item_id)
        if query is None:
            return None
        return SimilarResponse(query="item", k=k, item=self.item(item_id), results=self.hits(query, k),
                               took_ms=round(1000 * (time.perf_counter() - start), 3), query_words=self.words(query))

    def hits(self, query: np.ndarray, k: int) -> list[Hit]:
        scores, ids = self.index.search(query[None], k)
        return [Hit(score=float(s), words=self.words(self.index.vector(int(i))) if self.lexical else None,
                    **self.item(int(i)).model_dump()) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def item(self, item_id: int) -> Item:
        return Item(id=item_id, caption=self.captions.get(item_id, ""),
                    image_url=f"/image/{item_id}" if item_id in self.images else None)

    def modes(self) -> Modes:
        # an index holds one kind of vector; every query searches that kind
        what = self.index.info.get("what", "images")
        target = "text" if what == "texts" else "image"
        modes = [Mode(query="text", label=f"text → {target}"), Mode(query="image", label=f"image → {target}")]
        modes = modes if self.model is not None else []  # text and image queries need the model
        modes.append(Mode(query="item", label=f"indexed {target} → {target}"))  # stored vectors: no model needed
        return Modes(what=what, model=self.model is not None, modes=modes)


def make_thumbnail(path: str, size: int = THUMBNAIL_SIZE, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """A JPEG of at most size x size; QueryError for files too large to decode (a bomb's header is
    read, never its pixels)."""
    from PIL import Image, ImageOps

    from clipforge.data.transforms import to_rgb

    # Image.open raises DecompressionBombError for headers over 2x Pillow's limit; ours is checked
    # after draft, so a big JPEG still gets a thumbnail by decoding at 1/8 scale
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))
        w, h = image.size
        if w * h > max_pixels:
            raise QueryError(f"{w}x{h} is more than the {max_pixels} pixels this server decodes")
        image.load()
        image = to_rgb(ImageOps.exif_transpose(image))
    image.thumbnail((size, size))  # keeps the aspect ratio; the output is at most size x size
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the app
class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` (413) and bodies of unknown length (411)
    before anything reads them."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        from starlette.responses import JSONResponse

        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is None or not length.isdigit():
                response = JSONResponse({"detail": "send a Content-Length header"}, status_code=411)
                return await response(scope, receive, send)
            if int(length) > self.max_bytes:
                response = JSONResponse({"detail": f"request body is over {self.max_bytes} bytes"}, status_code=413)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def page_html() -> str:
    return (resources.files("clipforge.index") / "static" / "index.html").read_text(encoding="utf-8")


def create_app(index_dir: str | Path, checkpoint: str | Path | None = None, *,
               max_request_bytes: int = MAX_REQUEST_BYTES, max_image_pixels: int = MAX_IMAGE_PIXELS):
    """The FastAPI app serving ``index_dir`` (query model: ``checkpoint`` or the one the index records)."""
    require_server_deps()
    from fastapi import FastAPI, HTTPException, Path as PathParam, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    searcher = Searcher(index_dir, checkpoint, max_image_pixels=max_image_pixels)
    app = FastAPI(title="clipforge search", version="1",
                  description="Search an image/caption index built with clipforge by text, image or embedding.")
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    app.state.searcher = searcher

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        # one readable message per problem, e.g. "k: Input should be less than or equal to 100"
        messages = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
            message = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "string_unicode":  # JSON's "\ud800": a lone surrogate, not a character
                message = "not valid Unicode text (it holds a lone surrogate such as \\ud800); send UTF-8 text"
                where = where or "a field name"
            if err["type"] == "json_invalid":  # loc is ("body", offset): say so rather than "12: JSON decode error"
                where, reason = "", (err.get("ctx") or {}).get("error", "cannot parse")
                message = f"the body is not valid JSON: {reason} (character {err['loc'][-1]})"
            messages.append(f"{where}: {message}" if where else message)
        # the input is echoed back, and a lone surrogate cannot be encoded as UTF-8: escape them all
        return JSONResponse(utf8_safe({"detail": "; ".join(messages), "errors": jsonable(exc.errors())}),
                            status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html()

    @app.get("/health", response_model=Health)
    def health() -> Health:
        info = searcher.index.info
        return Health(kind=info["kind"], what=info.get("what", "images"), count=len(searcher.index), dim=searcher.index.dim)

    @app.get("/modes", response_model=Modes)
    def modes() -> Modes:
        """The query modes this server answers, labelled source → target (what the page offers)."""
        return searcher.modes()

    @app.post("/search", response_model=SearchResponse, responses={422: {"description": "Invalid query"}})
    def search(request: SearchRequest) -> SearchResponse:
        try:
            return searcher.search(request)
        except QueryError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None

    @app.get("/similar/{item_id}", response_model=SimilarResponse, responses={404: {"description": "Not indexed"}})
    def similar(item_id: int = PathParam(..., ge=0, le=MAX_ITEM_ID, description="An id from /search results."),
                k: int = Query(10, ge=1, le=MAX_K, description=f"Number of results (1..{MAX_K}).")) -> SimilarResponse:
        """Search by an indexed item: its stored vector is the query (the item itself comes first)."""
        found = searcher.similar(item_id, k)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no indexed item with id {item_id}")
        return found

    @app.get("/image/{item_id}", responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "Not indexed"},
                                            422: {"description": "Too large to decode"}})
    def image(item_id: int = PathParam(..., ge=0, le=MAX_ITEM_ID, description="An id from /search results.")):
        from PIL import Image

        path = searcher.images.get(item_id)
        if path is None:
            raise HTTPException(status_code=404, detail=f"no indexed image with id {item_id}")
        try:
            data = _cached_thumbnail(path, searcher.max_image_pixels)
        except (QueryError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # a file in the index whose header claims a huge size: refused before decoding
            raise HTTPException(status_code=422, detail=f"image {item_id} is too large to decode: {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise HTTPException(status_code=404, detail=f"image {item_id} cannot be read ({type(e).__name__})") from None
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


@lru_cache(maxsize=2048)
def _cached_thumbnail(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    return make_thumbnail(path, max_pixels=max_pixels)


def jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # pydantic puts the exception object in "ctx"; keep only what JSON can carry
    return [{k: (str(v)[:200] if k in ("ctx", "input") else v) for k, v in e.items() if k != "url"} for e in errors]


def utf8_safe(value: Any) -> Any:
    """``value`` with every string encodable as UTF-8: lone surrogates become the text ``\\ud800``."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [utf8_safe(v) for v in value]
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, checkpoint: str | None = None) -> None:
    import warnings

    require_server_deps()
    import uvicorn

    if not 1 <= port <= 65535:  # uvicorn would fail only after printing the URL
        raise ServerError(f"--port must be between 1 and 65535, got {port}")
    if not is_loopback(host):
        warnings.warn(f"binding {host}: the search API and your indexed images are reachable from the network")
    app = create_app(index_dir, checkpoint)
    print(f"clipforge search: http://{host}:{port}/  (API schema: http://{host}:{port}/docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
