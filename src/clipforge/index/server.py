"""The search server: a small FastAPI app over an index directory.

    clipforge serve idx/ --port 8000      # http://127.0.0.1:8000/ (page), /docs and /openapi.json (schema)

    POST /search     {"text": "..."} | {"image": "<base64 or data: URL>"} | {"embedding": [...]}, "k": 10
                     -> {"query": "text", "k": 10, "results": [{"id", "score", "caption", "image_url"}], "took_ms"}
    GET  /image/{id} a JPEG thumbnail of an indexed image (only those: ids, never paths, come in)
    GET  /health     index kind, size, dimension

Safe by default: binds 127.0.0.1, refuses request bodies over ``max_request_bytes`` (413), decodes
at most ``max_image_pixels`` pixels, and answers every malformed field with 422 and a message.
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
MAX_EMBED_DIM = 8192
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


class Hit(BaseModel):
    id: int
    score: float
    caption: str
    image_url: str | None


class SearchResponse(BaseModel):
    query: Literal["text", "image", "embedding"]
    k: int
    results: list[Hit]
    took_ms: float


class Health(BaseModel):
    kind: str
    what: str
    count: int
    dim: int


# ----------------------------------------------------------------------------- helpers
class QueryError(ValueError):
    """A well-formed request whose content cannot be used (bad image, wrong dimension): 422."""


def decode_image(data: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """base64 (or a data: URL) -> RGB PIL image; every failure is a QueryError with a message."""
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
            w, h = image.size
            if w * h > max_pixels:
                raise QueryError(f"image: {w}x{h} is more than {max_pixels} pixels; send a smaller image")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except QueryError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise QueryError(f"image: cannot be decoded ({type(e).__name__})") from None


def unit_vector(values: list[float], dim: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.shape != (dim,):
        raise QueryError(f"embedding: expected {dim} numbers (the index's dimension), got {v.size}")
    norm = float(np.linalg.norm(v))
    if not np.isfinite(v).all() or norm == 0.0:
        raise QueryError("embedding: must be finite and not all zero")
    return v / norm


class Searcher:
    """The index, its metadata and (for text and image queries) the model, behind one ``search``."""

    def __init__(self, index_dir: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        import pyarrow.parquet as pq

        from clipforge.index.dense import META_FILE, DenseIndex

        self.index = DenseIndex(index_dir)
        meta = pq.read_table(Path(index_dir) / META_FILE).to_pydict()
        self.captions = dict(zip(meta["id"], meta.get("caption", [""] * len(meta["id"]))))
        self.images = dict(zip(meta["id"], meta["image"])) if "image" in meta else {}
        checkpoint = checkpoint or self.index.info.get("checkpoint")
        self.model = self.preprocess = self.tokenizer = None
        if checkpoint and Path(checkpoint).exists():
            from clipforge.api import load

            self.model, self.preprocess, self.tokenizer = load(checkpoint, device=device)
            if self.model.cfg.embed_dim != self.index.dim:
                raise ServerError(f"checkpoint {checkpoint} embeds into {self.model.cfg.embed_dim} dimensions but "
                                  f"the index has {self.index.dim}; pass the checkpoint the index was built with")
        self.max_image_pixels = max_image_pixels
        self._lock = threading.Lock()  # one model call at a time: CPU threads are already all in use

    def embed_query(self, request: SearchRequest) -> np.ndarray:
        import torch

        if request.embedding is not None:
            return unit_vector(request.embedding, self.index.dim)
        image = decode_image(request.image, self.max_image_pixels) if request.image is not None else None
        if self.model is None:
            raise QueryError("this server has no model loaded (start it with --ckpt); only embedding queries work")
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
        scores, ids = self.index.search(query[None], request.k)
        hits = [
            Hit(id=int(i), score=float(s), caption=self.captions.get(int(i), ""),
                image_url=f"/image/{int(i)}" if int(i) in self.images else None)
            for s, i in zip(scores[0], ids[0]) if i >= 0
        ]
        kind = "text" if request.text is not None else "image" if request.image is not None else "embedding"
        return SearchResponse(query=kind, k=request.k, results=hits, took_ms=round(1000 * (time.perf_counter() - start), 3))


def make_thumbnail(path: str, size: int = THUMBNAIL_SIZE) -> bytes:
    from clipforge.data.sources import load_image

    image = load_image(path, size)
    image.thumbnail((size, size))
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
    from fastapi import FastAPI, HTTPException, Path as PathParam
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
            where = ".".join(str(p) for p in err["loc"] if p != "body")
            messages.append(f"{where}: {err['msg']}" if where else str(err["msg"]).removeprefix("Value error, "))
        return JSONResponse({"detail": "; ".join(messages), "errors": jsonable(exc.errors())}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html()

    @app.get("/health", response_model=Health)
    def health() -> Health:
        info = searcher.index.info
        return Health(kind=info["kind"], what=info.get("what", "images"), count=len(searcher.index), dim=searcher.index.dim)

    @app.post("/search", response_model=SearchResponse, responses={422: {"description": "Invalid query"}})
    def search(request: SearchRequest) -> SearchResponse:
        try:
            return searcher.search(request)
        except QueryError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None

    @app.get("/image/{item_id}", responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "Not indexed"}})
    def image(item_id: int = PathParam(..., ge=0, description="An id from /search results.")):
        path = searcher.images.get(item_id)
        if path is None:
            raise HTTPException(status_code=404, detail=f"no indexed image with id {item_id}")
        try:
            data = _cached_thumbnail(path)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise HTTPException(status_code=404, detail=f"image {item_id} cannot be read ({type(e).__name__})") from None
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


@lru_cache(maxsize=2048)
def _cached_thumbnail(path: str) -> bytes:
    return make_thumbnail(path)


def jsonable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # pydantic puts the exception object in "ctx"; keep only what JSON can carry
    return [{k: (str(v)[:200] if k in ("ctx", "input") else v) for k, v in e.items() if k != "url"} for e in errors]


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

    if not is_loopback(host):
        warnings.warn(f"binding {host}: the search API and your indexed images are reachable from the network")
    app = create_app(index_dir, checkpoint)
    print(f"clipforge search: http://{host}:{port}/  (API schema: http://{host}:{port}/docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
