"""`transferlab serve` as a user runs it: a real uvicorn process on a free port, answers equal to
`predict`, bad uploads as 4xx JSON while it keeps serving, concurrent requests batched, and a
clean exit on SIGTERM."""

import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from transferlab import predict

pytest.importorskip("fastapi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def multipart(files: list[tuple[str, bytes]], part="file", **fields: str) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{part}"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + body
        + b"\r\n"
        for name, body in files
    ) + b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    return parts + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


def start(path, *options: str) -> tuple[str, subprocess.Popen]:
    """`transferlab serve PATH OPTIONS` on a free port, once /health answers: (url, process)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab", "serve", str(path), "--port", str(port), *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if call(url + "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the server did not start: {proc.stderr.read()}")
    return url, proc


@pytest.fixture(scope="module")
def server(trained_run):
    url, proc = start(trained_run, "--max-mb", "0.05", "--max-wait-ms", "200", "--top-k", "2")
    yield url, proc
    if proc.poll() is None:
        proc.kill()


def test_predict_answers_as_the_library_does(server, folder_data, trained_run):
    url, _ = server
    files = sorted((folder_data / "test" / "b").iterdir())[:3]
    want, _ = predict.predict(trained_run, [str(f) for f in files], top_k=2, quiet=True)
    status, got = call(url + "/predict", *multipart([(f.name, f.read_bytes()) for f in files]))
    assert status == 200 and [r["file"] for r in got["results"]] == [f.name for f in files]
    for g, w in zip(got["results"], want, strict=True):
        assert [p["class"] for p in g["predictions"]] == [p["class"] for p in w["predictions"]]
        assert [p["prob"] for p in g["predictions"]] == pytest.approx(
            [p["prob"] for p in w["predictions"]], abs=1e-5
        )
    status, raw = call(url + "/predict?top_k=1", files[0].read_bytes())  # the raw body
    assert status == 200 and len(raw["results"][0]["predictions"]) == 1
    status, info = call(url + "/info")
    assert info["classes"] == ["a", "b", "c", "d"] and info["members"][0]["preprocessing"]
    assert info["path"] == trained_run.name  # not where the server keeps its files


def test_bad_uploads_are_4xx_json_and_the_server_keeps_serving(server, folder_data):
    url, _ = server
    good = next((folder_data / "test" / "a").iterdir()).read_bytes()
    cases = [(b"", 400, "empty"), (b"not an image at all", 415, "not a readable image"),
             (good[: len(good) // 2], 415, "not a readable image"),
             (b"\x89PNG" + bytes(60_000), 413, "limit is 0.05 MB")]  # fmt: skip
    for body, status, words in cases:
        got_status, got = call(url + "/predict", body)
        assert got_status == status and words in got["error"], (status, got)
    got_status, got = call(url + "/predict", *multipart([("big.png", b"\x89PNG" + bytes(60_000))]))
    assert got_status == 413 and "big.png is 0.06 MB; the limit is 0.05 MB" in got["error"], got  # fmt: skip
    assert call(url + "/predict?top_k=0", good)[0] == 422
    status, every = call(url + "/predict?top_k=99", good)  # all 4 classes, as predict --top-k 99
    assert status == 200 and len(every["results"][0]["predictions"]) == 4
    assert call(url + "/predict?top_k=x", good)[0] == 422
    # hostile pass 28: a form's top_k (and any other text field) was ignored without a word
    status, one = call(url + "/predict", *multipart([("a.png", good)], top_k="1"))
    assert status == 200 and len(one["results"][0]["predictions"]) == 1
    status, two = call(url + "/predict?top_k=2", *multipart([("a.png", good)], top_k=" 2"))
    assert status == 200 and len(two["results"][0]["predictions"]) == 2
    status, got = call(url + "/predict", *multipart([("a.png", good), ("k.png", good)], top_k="1"))
    assert status == 200 and len(got["results"]) == 2
    status, got = call(url + "/predict", *multipart([("a.png", good)], part="top_k"))
    assert status == 400 and "top_k is a text field, not a file" in got["error"]
    for query, fields, want, words in [("", {"top_k": "0"}, 422, "top_k is a whole number, 1 or more"),
                                       ("?top_k=2", {"top_k": "1"}, 422, "top_k is given as 2, 1: give one"),
                                       ("?top_k=1&top_k=2", {}, 422, "given as 1, 2"),  # (pass 29: the last)
                                       ("?top_k=2", {"top_k": "\u0662"}, 422, "got '\u0662'"),
                                       ("", {"caption": "x"}, 400, "field(s) caption are not read"),
                                       ("?TOP_K=1", {}, 400, "unknown query parameter(s) TOP_K: the one read is top_k")]:  # fmt: skip
        got_status, got = call(url + "/predict" + query, *multipart([("a.png", good)], **fields))
        assert got_status == want and words in got["error"], (fields, got)
    from PIL import Image

    huge = io.BytesIO()  # 450 KB of PNG, 144 Mpx (4 GB) decoded: refused from its header
    Image.new("L", (12_000, 12_000)).save(huge, "PNG")
    got_status, got = call(url + "/predict", huge.getvalue()[:50_000])
    assert got_status == 413 and "12000x12000 (144 Mpx); the limit is 89 Mpx" in got["error"]
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 1, 0, 0, 0, 0)
    )
    got_status, got = call(url + "/predict", bomb + png_chunk(b"IEND", b""))  # PIL will not open
    assert (
        got_status == 413 and "a decompression bomb: the limit is 89 Mpx" in got["error"]
    )  # (500)
    many, headers = multipart([(f"{i}.png", good) for i in range(65)])
    got_status, got = call(url + "/predict", many, headers)
    assert got_status == 413 and "holds 65 images; the limit is 64" in got["error"]
    # FastAPI's own answers take the same shape ({"detail": ...} was theirs)
    form = {"Content-Type": "multipart/form-data"}  # no boundary: a form that cannot be read
    for where, body, headers, status in (("/predict", b"x", form, 400), ("/nowhere", None, {}, 404),
                                         ("/health", b"x", {}, 405)):  # fmt: skip
        got_status, got = call(url + where, body, headers)
        assert got_status == status and set(got) == {"error"}, (where, got)
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}  # curl --data top_k=1:
    got_status, got = call(url + "/predict", b"top_k=1", urlencoded)  # "not a readable image"
    assert got_status == 415 and "the body is a URL-encoded form (curl --data k=v)" in got["error"]
    assert call(url + "/predict", good, urlencoded)[0] == 200  # curl --data-binary @IMG's header
    got_status, got = call(url + "/predict", good.replace(b"\n", b""), urlencoded)  # --data @IMG
    assert got_status == 415 and "(curl --data @IMG strips an image's line breaks): send it with --data-binary @IMG" in got["error"]  # fmt: skip
    got_status, got = call(url + "/predict", b"junk", urlencoded)  # pass 52 (F6): no image at all
    assert got_status == 415 and "--data" not in got["error"]  # (was told to use --data-binary)
    got_status, got = call(url + "/predict", good[:60], urlencoded)  # pass 53 (F7): cut short,
    assert got_status == 415 and "--data" not in got["error"]  # its line breaks whole: not curl's
    got_status, got = call(url + "/predict", good.replace(b"\n", b"").replace(b"\r", b""), {"Content-Type": "image/png"})  # fmt: skip
    assert got_status == 415 and "(curl --data @IMG strips an image's line breaks)" in got["error"]  # (-H type)  # fmt: skip
    shouted = {"Content-Type": "APPLICATION/X-WWW-FORM-URLENCODED"}  # (media types: any case)
    assert "URL-encoded form" in call(url + "/predict", b"top_k=1", shouted)[1]["error"]
    assert call(url + "/predict", good)[0] == 200  # still serving


def test_requests_arriving_together_are_batched(server, folder_data):
    url, _ = server
    before = call(url + "/health")[1]
    images = [f.read_bytes() for f in sorted((folder_data / "test" / "c").iterdir())[:8]]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: call(url + "/predict", body), images))
    assert all(status == 200 for status, _ in answers)
    after = call(url + "/health")[1]
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # some shared a model call


def test_the_readme_curl_example_works_as_written(server, folder_data, tmp_path):
    import re
    import shutil
    from pathlib import Path

    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"<!-- curl-example -->\n```bash\n(.*?)\n```", readme, re.S)[1]
    url, _ = server
    images = sorted((folder_data / "test" / "d").iterdir())
    shutil.copy(images[0], tmp_path / "photo.jpg")
    shutil.copy(images[1], tmp_path / "other.jpg")
    command = command.replace("http://127.0.0.1:8000", url)
    out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    results = json.loads(out)["results"]
    assert [r["file"] for r in results] == ["photo.jpg", "other.jpg"]
    assert all(len(r["predictions"]) == 3 for r in results)


def test_a_taken_port_is_one_line_before_any_model_loads(server, trained_run, capsys):
    from transferlab.cli import main

    port = server[0].rsplit(":", 1)[1]
    assert main(["serve", str(trained_run), "--port", port]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_sigterm_stops_it_cleanly(server):
    url, proc = server
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then exits by the signal it got (143 in a shell)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert "Traceback" not in proc.stderr.read()
    with pytest.raises(OSError):  # nothing left listening
        call(url + "/health")


def test_a_default_top_k_above_the_classes_is_clamped_as_predict_does(trained_run, capsys):
    """`serve --top-k 50` on 4 classes started, then refused every request that did not pass
    ?top_k=, blaming a value the client never sent; a negative --max-wait-ms was taken."""
    import inspect

    from transferlab import checkpoint, serve
    from transferlab.cli import main

    app = serve.app_for(trained_run, top_k=50)
    route = next(r for r in app.routes if getattr(r, "path", "") == "/predict")
    assert inspect.signature(route.endpoint).parameters["top_k"].default == 50
    classes = len(checkpoint.read_meta(trained_run)["classes"])
    live = serve.Live(trained_run)
    rows, _ = live.rows([Image.new("RGB", (24, 24))], 50)  # the batcher's call
    assert len(rows[0]["predictions"]) == classes
    assert main(["serve", str(trained_run), "--max-wait-ms", "-5"]) == 2
    assert "--max-wait-ms is 0..10000" in capsys.readouterr().err
    for flag, value in (("--top-k", "0"), ("--max-batch", "-1"), ("--max-mb", "nan")):
        assert main(["serve", str(trained_run), flag, value]) == 2  # the flag, not all four
        assert f"{flag} must be positive, got {value}" in capsys.readouterr().err
    for value in ("inf", "1e300"):  # a traceback; no limit at all, unsaid
        assert main(["serve", str(trained_run), "--max-mb", value]) == 2
        err = capsys.readouterr().err
        assert "--max-mb is at most 10000" in err and len(err.strip().splitlines()) == 1


def test_a_run_replaced_while_served_is_answered_from_the_files_on_disk(tmp_path, folder_data):
    """`train --overwrite` of the served run: serve kept answering with the old weights from
    memory (a model that existed nowhere on disk) and /health said ok."""
    from transferlab import checkpoint
    from transferlab.trainer import fit

    from conftest import tiny_cfg

    run, image = tmp_path / "r", next((folder_data / "test" / "a").iterdir())
    fit(tiny_cfg(f"folder:{folder_data}", seed=1), run, quiet=True)
    url, proc = start(run, "--max-wait-ms", "0")
    try:
        status, old = call(url + "/predict?top_k=4", image.read_bytes())
        assert status == 200
        first = call(url + "/info")[1]["members"][0]["weights_sha256"]
        assert first == checkpoint.read_meta(run)["weights_sha256"]
        (run / checkpoint.META).rename(tmp_path / "meta.json")  # as while it trains again
        (run / "state").mkdir(exist_ok=True)
        status, got = call(url + "/predict", image.read_bytes())
        assert status == 503 and "changed on disk" in got["error"], got
        assert "r is being trained again (or was stopped before it finished)" in got["error"]
        status, health = call(url + "/health")
        assert status == 503 and health["status"] == "unavailable"
        (tmp_path / "meta.json").rename(run / checkpoint.META)
        fit(tiny_cfg(f"folder:{folder_data}", seed=2, lr=0.05), run, overwrite=True, quiet=True)
        want, _ = predict.predict(run, [str(image)], top_k=4, quiet=True)
        status, new = call(url + "/predict?top_k=4", image.read_bytes())
        assert status == 200 and call(url + "/health")[0] == 200
        probs = [[p["prob"] for p in r["predictions"]] for r in (new["results"][0], want[0])]
        assert probs[0] == pytest.approx(probs[1], abs=1e-5)  # the new weights answer
        assert probs[0] != pytest.approx([p["prob"] for p in old["results"][0]["predictions"]])
        assert call(url + "/info")[1]["members"][0]["weights_sha256"] != first
    finally:
        proc.kill()
        assert "Traceback" not in proc.communicate()[1]


def test_an_ensemble_whose_member_changed_is_not_served(tmp_path, folder_data, trained_run):
    import shutil

    from transferlab import ensembles, serve
    from transferlab.trainer import fit

    from conftest import tiny_cfg

    twin = tmp_path / "twin"
    shutil.copytree(trained_run, twin, ignore=shutil.ignore_patterns(".transferlab.lock"))
    ensembles.build([trained_run, twin], "soft", tmp_path / "e", quiet=True)
    live = serve.Live(tmp_path / "e")
    assert live.current() is live.current()  # nothing changed: not loaded again
    fit(tiny_cfg(f"folder:{folder_data}", seed=3), twin, overwrite=True, quiet=True)
    with pytest.raises(serve.BadUpload) as err:
        live.rows([Image.new("RGB", (24, 24))], 2)
    assert err.value.status == 503 and "twin" in err.value.message


@pytest.mark.parametrize(
    "content_type,cap_mb", [("image/png", 0.5), ("multipart/form-data; boundary=x", 8)]
)
def test_a_body_without_its_length_is_read_only_up_to_the_limit(content_type, cap_mb):
    """Hostile pass 18: a chunked upload (no Content-Length) was read whole, then refused: a
    1 GB body grew the server by 2 GB. Now it stops reading once past the limit."""
    import asyncio

    from starlette.requests import Request

    from transferlab import serve

    sent = 0

    async def receive():  # 64 MB on offer, in 64 KB chunks
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": bytes(65536), "more_body": sent < 1000}

    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(b"content-type", content_type.encode())]}  # fmt: skip
    with pytest.raises(serve.BadUpload, match=f"passed {cap_mb:g} MB before its end; the limit is 0.5 MB"):  # fmt: skip
        asyncio.run(serve.uploads_of(Request(scope, receive), max_mb=0.5))
    assert sent * 65536 <= cap_mb * 1e6 + 65536  # one chunk past the limit at most


def test_a_request_cancelled_while_batched_does_not_stop_the_worker():
    """Its future was set all the same: InvalidStateError ended the worker, and every request
    after it waited for ever."""
    import asyncio

    from transferlab import serve

    class Answers:
        def rows(self, images, k):
            return [{"predictions": [{"label": "a"}]} for _ in images], None

    async def requests():
        batcher = serve.Batcher(Answers(), max_batch=4, max_wait_ms=20, queue=asyncio.Queue())
        worker = asyncio.create_task(batcher.run())
        left = asyncio.get_running_loop().create_future()
        left.cancel()  # its client hung up while it waited in the queue
        batcher.queue.put_nowait((None, 1, left))
        await asyncio.sleep(0.1)
        try:
            return await asyncio.wait_for(batcher.predict([None], 1), 5)
        finally:
            worker.cancel()

    assert asyncio.run(requests()) == [[{"label": "a"}]]
