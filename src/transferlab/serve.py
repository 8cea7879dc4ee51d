"""`transferlab serve`: a run or an ensemble behind an HTTP API (FastAPI on uvicorn; the optional
extra `serve`).

- `POST /predict`: one or many images, as multipart form files (any field name) or as the raw
  request body; `?top_k=N` or a form field top_k (other fields or parameters: 400). Answers
  `{"results": [{"file", "predictions": [{"class", "name", "prob"}]}]}` in upload order.
- `GET /health`: `{"status": "ok", "requests", "images", "batches"}`; 503 with `"error"` while
  the folder cannot be served (see below).
- `GET /info`: classes, names, the ensemble method and TTA, each member's preprocessing and weights'
  sha256 (which model answers).

Requests that arrive together are batched: the first image waits up to `max_wait_ms` for
others (up to `max_batch` images), and the model runs once on all of them in one worker thread.
A bad upload (empty, over `max_mb`, not an image) is a 4xx JSON `{"error": ...}`; the server
keeps serving.

What answers is what is on disk: before each batch the files the answers come from (a run's
meta.json and weights; an ensemble's own files and its members') are stat-ed. When they change
(`train --overwrite` of the served run, a member retrained) the folder is loaded again; while it
cannot be (still training, a member changed under its ensemble) requests get 503 saying why,
never the old model's answers from memory.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import checkpoint, ensembles
from .config import UserError

try:  # the optional extra `serve`; module-level so FastAPI resolves the handlers' annotations
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
except ImportError:
    FastAPI = None


def sources(path: Path) -> list[Path]:
    """The files a served folder's answers come from: a run's meta.json and weights; an
    ensemble's ensemble.json, combiner and its members' files."""
    if not (path / ensembles.ENSEMBLE).is_file():
        return [path / checkpoint.META, checkpoint.weights_path(path)]
    try:
        runs = [Path(m["run"]) for m in ensembles.read(path)["members"]]
    except Exception:  # noqa: BLE001 - being rewritten: its own files show the change
        runs = []
    own = [path / ensembles.ENSEMBLE, path / ensembles.PARAMS]
    return own + [f for run in runs for f in sources(run)]


def stamp(path: Path) -> tuple:
    """What `sources` are now (inode, size, mtime; None if gone): a new file, or one written in
    place, changes it; a hash would read every weight on every batch."""
    seen = []
    for file in sources(path):
        try:
            st = file.stat()
            seen.append((str(file), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            seen.append((str(file), None))
    return tuple(seen)


class Live:
    """The served folder's models, loaded again when its files change (`stamp`); `problem` says
    why it cannot be served now (answered as 503) until its files change again."""

    def __init__(self, path: str | Path):
        from . import predict

        self.path, self._load = Path(path), predict.Predictor
        self.stamp = stamp(self.path)  # before loading: a change during the load is seen next
        self.predictor, self.problem = self._load(self.path), None
        self._guard = threading.Lock()  # the worker and /health may both look

    def current(self):
        """The predictor for the files on disk now, or BadUpload(503) saying why there is none."""
        with self._guard:
            now = stamp(self.path)
            if now != self.stamp:
                self.stamp, self.predictor = now, None  # the old model is never used again
                try:
                    self.predictor, self.problem = self._load(self.path), None
                    print(f"reloaded {self.path}: its files changed", file=sys.stderr, flush=True)
                except Exception as err:  # noqa: BLE001 - told to every request until it loads
                    self.problem = _why(self.path, err)
                    print(f"not serving {self.path}: {err}", file=sys.stderr, flush=True)
            if self.problem:
                raise BadUpload(
                    503, f"the served folder {self.path.name} changed on disk and cannot be "
                    f"served now: {self.problem}; it is loaded again when its files change"
                )  # fmt: skip
            return self.predictor

    def rows(self, images: list, top_k: int) -> tuple[list[dict], list[str]]:
        return self.current().rows(images, top_k)


def _why(path: Path, err: Exception) -> str:
    """Why a folder cannot be served, in an API client's words: a run being written (trained
    again, or stopped before it finished) is said as that, not as "not a run folder"."""
    from . import outputs

    mark = outputs.read_mark(path) or {}
    if mark.get("kind") == "run" and not (path / checkpoint.META).is_file():
        return f"{path.name} is being trained again (or was stopped before it finished)"
    return str(err)


@dataclass
class Batcher:
    """Collects images from concurrent requests into batches for one model worker."""

    live: Live
    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue: asyncio.Queue | None = None
    counts: dict = field(default_factory=lambda: {"requests": 0, "images": 0, "batches": 0})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(items) < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:  # (TimeoutError's alias since 3.11; not in 3.10)  # noqa: UP041
                    break
            images = [image for image, _, _ in items]
            k = max(top_k for _, top_k, _ in items)
            self.counts["batches"] += 1
            try:
                rows, _ = await asyncio.to_thread(self.live.rows, images, k)
            except Exception as err:  # noqa: BLE001 - every waiting request hears of it
                for _, _, future in items:
                    if not future.done():  # (a request cancelled meanwhile: its client left)
                        future.set_exception(err)
                continue
            for row, (_, top_k, future) in zip(rows, items, strict=True):
                if not future.done():  # (setting it raised, and the worker died for good)
                    future.set_result(row["predictions"][:top_k])

    async def predict(self, images: list[Image.Image], top_k: int) -> list[list[dict]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures, strict=True):
            self.queue.put_nowait((image, top_k, future))
        self.counts["requests"] += 1
        self.counts["images"] += len(images)
        return list(await asyncio.gather(*futures))


MAX_FILES = 64  # images in one request (each up to --max-mb, then decoded)


class BadUpload(Exception):
    """A request the server refuses: its status and a one-line reason (sent as JSON)."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def urlencoded(request) -> bool:  # curl --data's (and --data-binary's, urllib's) header
    return request.headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded")  # fmt: skip


# how image files begin (PNG, JPEG, GIF, BMP, WebP, TIFF): a body that does, is unreadable and
# holds no line break is an image curl --data stripped, whatever its type (passes 52, 53)
IMAGE_STARTS = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*", b"MM\x00*")


async def uploads_of(request, max_mb: float, fields: dict | None = None) -> list[tuple[str, bytes]]:  # fmt: skip
    """(name, bytes) per image: the form's files, or the raw body as one image; the form's
    text fields go into `fields`. The body is read only up to its limit (a raw one `max_mb`, a
    form 16 times that), whatever its length says or whether it says one (chunked): a 413 once
    it passes it."""
    form = request.headers.get("content-type", "").startswith("multipart/form-data")
    cap, body = max_mb * 1e6 * (16 if form else 1), bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise BadUpload(413, f"the body passed {cap / 1e6:g} MB before its end; the limit is {max_mb} MB")  # fmt: skip
    if urlencoded(request) and body.isascii() and b"=" in body:  # (--data-binary @IMG: read)
        raise BadUpload(415, "the body is a URL-encoded form (curl --data k=v), which holds no image: send images as form files (-F file=@IMG) or as the body (--data-binary @IMG), top_k as ?top_k=N")  # fmt: skip
    if not form:
        return [("body", bytes(body))]

    async def replay():  # the form parsed from what was read
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    form = await Request(request.scope, replay).form()
    uploads = [
        (v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")
    ]
    for k, v in form.multi_items():
        if k == "top_k" and not isinstance(v, str):  # (it was predicted as an image)
            raise BadUpload(400, "top_k is a text field, not a file: -F top_k=3 or ?top_k=3")
        if isinstance(v, str) and fields is not None:
            fields.setdefault(k, []).append(v)
    if not uploads:
        raise BadUpload(400, "the form holds no files: send images as form files")
    return uploads


def _form_top_k(fields: dict[str, list[str]], queries: list[str], top_k: int) -> int:
    """top_k from ?top_k= and the form's top_k fields, which agree (a form's was ignored, then
    the last of several was taken); any other text field is refused (it was ignored)."""
    if other := sorted(set(fields) - {"top_k"}):
        raise BadUpload(400, f"the form's text field(s) {', '.join(other)} are not read: send images as form files, top_k as ?top_k=N or a top_k field")  # fmt: skip
    said = [v.strip() for v in (*queries, *fields.get("top_k", []))]
    if bad := [v for v in said if not (v.isascii() and v.isdecimal()) or int(v) < 1]:
        raise BadUpload(422, f"top_k is a whole number, 1 or more, got {bad[0]!r}")
    if len({int(v) for v in said}) > 1:
        raise BadUpload(422, f"top_k is given as {', '.join(said)}: give one")
    return int(said[0]) if said else top_k


_OVER_LIMIT = (
    f"the limit is {(Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} Mpx, as transferlab predict's"
)


def image_of(name: str, body: bytes, max_mb: float) -> Image.Image:
    """An upload as 8-bit RGB (any mode, as files are read), or the 4xx that says why not."""
    from . import decoding

    if not body:
        raise BadUpload(400, f"{name} is empty (0 bytes)")
    if len(body) > max_mb * 1e6:
        raise BadUpload(413, f"{name} is {len(body) / 1e6:.3g} MB; the limit is {max_mb} MB")
    try:
        with Image.open(io.BytesIO(body)) as header:  # the size, before any pixel is decoded
            pixels, size = header.width * header.height, header.size
    except Image.DecompressionBombError:  # over twice the limit: PIL refuses to open it
        raise BadUpload(413, f"{name} is a decompression bomb: {_OVER_LIMIT}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise BadUpload(415, f"{name} is not a readable image (an unknown format)") from None
    if pixels > (Image.MAX_IMAGE_PIXELS or pixels):  # a 450 KB PNG can hold 144 Mpx (4 GB)
        raise BadUpload(
            413, f"{name} is {size[0]}x{size[1]} ({pixels / 1e6:.0f} Mpx); {_OVER_LIMIT}"
        )
    try:
        return decoding.open_image(io.BytesIO(body), 3)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        why = "an unknown format" if isinstance(err, UnidentifiedImageError) else err
        raise BadUpload(415, f"{name} is not a readable image ({why})") from None


def app_for(path: str | Path, max_batch: int = 32, max_wait_ms: float = 5.0, max_mb: float = 20,
            top_k: int = 5):  # fmt: skip
    """The FastAPI app serving the run or ensemble at `path` (its models loaded now)."""
    if FastAPI is None:
        raise UserError("serve needs FastAPI and uvicorn: pip install 'transferlab[serve]'")
    from contextlib import asynccontextmanager

    live = Live(path)
    batcher = Batcher(live, max_batch, max_wait_ms)
    limit = int(max_mb * 1e6)

    @asynccontextmanager
    async def lifespan(app):
        batcher.queue = asyncio.Queue()
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title=f"transferlab: {Path(path).name}", lifespan=lifespan)

    @app.exception_handler(BadUpload)
    async def bad_upload(request, err: BadUpload):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(HTTPException)  # 404, 405, a malformed form: {"detail"} was theirs
    async def http_error(request, err: HTTPException):
        return JSONResponse({"error": str(err.detail)}, err.status_code, dict(err.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)

    @app.post("/predict")
    async def predict_images(request: Request, top_k: int = top_k):
        if top_k < 1:  # above the class count: every class, as predict --top-k does
            raise BadUpload(422, f"top_k must be 1 or more, got {top_k}")
        declared = int(request.headers.get("content-length") or 0)
        if declared > limit * 16:  # far over: refused before reading it
            raise BadUpload(
                413, f"the request is {declared / 1e6:.3g} MB; the limit is {max_mb} MB"
            )
        if other := sorted(set(request.query_params) - {"top_k"}):  # (?TOP_K=1 was ignored)
            raise BadUpload(400, f"unknown query parameter(s) {', '.join(other)}: the one read is top_k")  # fmt: skip
        uploads = await uploads_of(request, max_mb, fields := {})
        top_k = _form_top_k(fields, request.query_params.getlist("top_k"), top_k)
        if len(uploads) > MAX_FILES:
            raise BadUpload(
                413, f"the request holds {len(uploads)} images; the limit is {MAX_FILES}"
            )
        try:  # decoded off the event loop: /health still answers
            images = await asyncio.to_thread(lambda: [image_of(n, b, max_mb) for n, b in uploads])
        except BadUpload as err:  # curl --data @IMG: its line breaks stripped
            if err.status == 415 and any(b.startswith(IMAGE_STARTS) and b"\n" not in b for _, b in uploads):  # fmt: skip
                err.message += "; it begins as an image and holds no line break (curl --data @IMG strips an image's line breaks): send it with --data-binary @IMG or -F file=@IMG"  # fmt: skip
            raise
        results = await batcher.predict(images, top_k)
        return {"results": [{"file": name, "predictions": preds}
                            for (name, _), preds in zip(uploads, results, strict=True)]}  # fmt: skip

    @app.get("/health")
    async def health():
        try:
            await asyncio.to_thread(live.current)
        except BadUpload as err:
            return JSONResponse(
                {"status": "unavailable", "error": err.message, **batcher.counts}, status_code=503
            )
        return {"status": "ok", **batcher.counts}

    @app.get("/info")
    async def info():
        predictor = await asyncio.to_thread(live.current)
        return described(predictor, path) | {"max_batch": max_batch, "max_mb": max_mb}

    return app


def described(predictor, path: str | Path) -> dict:
    """GET /info: what answers (classes, the combiner, its TTA, each member and its weights'
    sha256)."""
    members = [
        {"arch": m["arch"], "preprocessing": m["preprocessing"],
         "weights_sha256": m.get("weights_sha256")}
        for m in predictor.metas
    ]  # fmt: skip
    return {
        "path": Path(path).resolve().name,  # not the server's folders (host 0.0.0.0)
        "classes": predictor.classes,
        "names": predictor.names,
        "method": predictor.method,
        "tta": predictor.tta,
        "members": members,
    }


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve until Ctrl-C or SIGTERM (uvicorn finishes the requests in flight, then exits)."""
    import socket

    with socket.socket() as probe:  # before the models load: a taken port is one line
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): choose another "
                            "--port or --host") from None  # fmt: skip
    app = app_for(path, **options)
    import uvicorn

    from .stops import say_later

    say_later()  # every refusal is behind: the notes that waited for them

    print(f"serving {path} on http://{host}:{port} (POST /predict, GET /health, GET /info)",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
