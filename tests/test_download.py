"""`transferlab data get`: every standard set's archives, faked small and served from a local
HTTP server started here (no network), end as a spec that `data.load` reads; a cut download
resumes with a Range request; a corrupt one is refused in one line."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from transferlab import data, download
from transferlab.cli import main
from transferlab.config import UserError


class Server:
    """Serves `files` ({name: bytes}) with HTTP Range; `cut` bytes then a closed connection on
    the next request when set; `ranges` records the Range header of every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.honour_range, self.ranges = files, None, True, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                start = int(asked[6:-1]) if asked and server.honour_range else 0
                if start >= len(body) and asked:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut, server.cut = server.cut, None
                self.wfile.write(body[start : start + cut] if cut else body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _jpeg(i: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((40 * i) % 256, 80, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, body in members.items():
            z.writestr(name, body)
    return buf.getvalue()


def _batch(n: int, classes: int, key: str, first: int = 0) -> bytes:
    rng = np.random.default_rng(n)
    pixels = rng.integers(0, 255, (n, 3 * 32 * 32), dtype=np.uint8)
    return pickle.dumps({"data": pixels, key: [(first + i) % classes for i in range(n)]})


def _mat(**arrays) -> bytes:
    from scipy.io import savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def _cifar10():
    meta = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    members = {"cifar-10-batches-py/batches.meta": meta}
    members |= {
        f"cifar-10-batches-py/data_batch_{k}": _batch(4, 10, "labels", 4 * k) for k in range(1, 6)
    }
    members["cifar-10-batches-py/test_batch"] = _batch(10, 10, "labels")
    return {"cifar-10-python.tar.gz": _tar(members)}, (10, 20, 10)


def _cifar100():
    meta = pickle.dumps({"fine_label_names": [f"f{i:02d}" for i in range(100)]})
    members = {"cifar-100-python/meta": meta, "cifar-100-python/train": _batch(200, 100,
               "fine_labels"), "cifar-100-python/test": _batch(100, 100, "fine_labels")}  # fmt: skip
    return {"cifar-100-python.tar.gz": _tar(members)}, (100, 200, 100)


def _pets():
    names = [f"{breed}_{i}" for breed in ("Abyssinian", "great_pyrenees") for i in range(1, 6)]
    images = {f"images/{n}.jpg": _jpeg(i) for i, n in enumerate(names)}
    trainval = "".join(f"{n} 1 1 1\n" for n in names[:3] + names[5:8])
    test = "#comment\n" + "".join(f"{n} 1 1 1\n" for n in names[3:5] + names[8:])
    annotations = {"annotations/trainval.txt": trainval.encode(), "annotations/test.txt":
                   test.encode()}  # fmt: skip
    return {"images.tar.gz": _tar(images), "annotations.tar.gz": _tar(annotations)}, (2, 6, 4)


def _flowers():
    images = {f"jpg/image_{i:05d}.jpg": _jpeg(i) for i in range(1, 10)}
    labels = np.array([[1, 2, 3, 1, 2, 3, 1, 2, 3]])
    setid = _mat(trnid=np.array([[1, 2, 3]]), valid=np.array([[4, 5, 6]]),
                 tstid=np.array([[7, 8, 9]]))  # fmt: skip
    files = {"102flowers.tgz": _tar(images), "imagelabels.mat": _mat(labels=labels)}
    return files | {"setid.mat": setid}, (3, 3, 3)


def _food():
    ids = {"apple_pie": ["1", "2", "3"], "ramen": ["4", "5", "6"]}
    images = {f"food-101/images/{c}/{i}.jpg": _jpeg(int(i)) for c, v in ids.items() for i in v}
    meta = {"food-101/meta/train.txt": b"apple_pie/1\napple_pie/2\nramen/4\nramen/5\n",
            "food-101/meta/test.txt": b"apple_pie/3\nramen/6\n"}  # fmt: skip
    return {"food-101.tar.gz": _tar(images | meta)}, (2, 4, 2)


def _tiny():
    root, wnids = "tiny-imagenet-200", ["n01", "n02"]
    members = {f"{root}/wnids.txt": b"n01\nn02\n", f"{root}/words.txt": b"n01\tcat\nn02\tdog\n"}
    for k, w in enumerate(wnids):
        members |= {f"{root}/train/{w}/images/{w}_{i}.JPEG": _jpeg(k + i) for i in range(4)}
    members[f"{root}/val/val_annotations.txt"] = b"val_0.JPEG\tn01\nval_1.JPEG\tn02\n"
    members |= {f"{root}/val/images/val_{i}.JPEG": _jpeg(i) for i in range(2)}
    return {"tiny-imagenet-200.zip": _zip(members)}, (2, 8, 2)


def _scene():  # 3 per class with SCENE_TRAIN_PER_CLASS patched to 2: 2 train, 1 test each
    members = {f"{c}/image_{i:04d}.jpg": _jpeg(i) for c in ("bedroom", "MITcoast") for i in
               range(3)}  # fmt: skip
    return {"scene_categories.zip": _zip(members)}, (2, 4, 2)


FAKES = {"cifar10": _cifar10, "cifar100": _cifar100, "pets": _pets, "flowers102": _flowers,
         "food101": _food, "tiny-imagenet": _tiny, "15-scene": _scene}  # fmt: skip


def test_every_standard_set_has_a_fake():
    assert set(FAKES) == set(download.STANDARD)


@pytest.fixture
def serve(monkeypatch):
    """serve(name) -> the Server holding that set's fake archives, the catalog pointed at it."""
    servers = []
    monkeypatch.setattr(download, "SCENE_TRAIN_PER_CLASS", 2)

    def start(name: str, tamper=None):
        files, expected = FAKES[name]()
        md5s = {f: hashlib.md5(body).hexdigest() for f, body in files.items()}
        server = Server({f: tamper(body) if tamper else body for f, body in files.items()})
        servers.append(server)
        standard = download.STANDARD[name]
        resources = tuple(
            download.Resource(f"{server.url}/{r.filename}", md5s[r.filename])
            for r in standard.resources
        )
        monkeypatch.setitem(
            download.STANDARD, name, dataclasses.replace(standard, resources=resources)
        )
        return server, expected

    yield start
    for s in servers:
        s.close()


A_CLASS = {"cifar10": "c9", "cifar100": "f99", "pets": "great_pyrenees", "flowers102":
           "pink primrose", "food101": "apple_pie", "tiny-imagenet": "n02", "15-scene": "MITcoast"}  # fmt: skip


@pytest.mark.parametrize("name", list(FAKES))
def test_get_lays_out_each_set_for_its_spec(name, serve, tmp_path, capsys):
    server, (classes, train, test) = serve(name)
    assert main(["data", "get", name, "--to", str(tmp_path / "d"), "--quiet"]) == 0
    spec = capsys.readouterr().out.strip().rsplit("--data ", 1)[1]
    ds = data.load(spec, val_fraction=0.0 if name != "flowers102" else 0.1)
    assert len(ds.classes) == classes and A_CLASS[name] in ds.classes
    assert len(ds.splits["test"]) == test
    if name == "flowers102":  # its own val split, used as given
        assert (len(ds.splits["train"]), len(ds.splits["val"])) == (3, 3)
    else:
        assert len(ds.splits["train"]) + len(ds.splits["val"]) == train
    if name == "15-scene":  # the first two of each class (by name) train, the third test
        assert {p.rsplit("/", 1)[1] for p in ds.splits["test"].paths} == {"image_0002.jpg"}
    requests = len(server.ranges)
    standard = download.STANDARD[name]
    no_layout = dataclasses.replace(standard, layout=lambda root: 1 / 0)
    download.STANDARD[name] = no_layout  # the serve fixture restores it
    assert download.get(name, tmp_path / "d") == spec  # a second get: nothing fetched or redone
    assert len(server.ranges) == requests


def test_an_interrupted_download_resumes_with_a_range_request(serve, tmp_path):
    server, _ = serve("cifar10")
    server.cut = 5000
    with pytest.raises(UserError, match=r"stopped after 0\.0 MB .*run the same command again"):
        download.get("cifar10", tmp_path, quiet=True)
    part = tmp_path / "downloads" / "cifar-10-python.tar.gz.part"
    assert part.stat().st_size == 5000
    download.get("cifar10", tmp_path, quiet=True)
    assert server.ranges == [None, "bytes=5000-"]
    assert not part.exists() and (tmp_path / "cifar10" / "test").is_dir()


def test_a_server_that_ignores_range_is_read_from_the_start(serve, tmp_path):
    server, _ = serve("cifar10")
    server.cut, server.honour_range = 5000, False
    with pytest.raises(UserError):
        download.get("cifar10", tmp_path, quiet=True)
    download.get(
        "cifar10", tmp_path, quiet=True
    )  # 200 with the whole file: rewritten, not appended
    assert (tmp_path / "cifar10" / "train").is_dir()


def test_a_corrupt_archive_is_refused_in_one_line_and_not_kept(serve, tmp_path, capsys):
    serve("cifar10", tamper=lambda body: body[:-10] + b"0123456789")
    code = main(["data", "get", "cifar10", "--to", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cifar-10-python.tar.gz is corrupt (MD5" in err
    assert list(tmp_path.iterdir()) == []  # the folder as it was: nothing kept, nothing claimed


def test_an_archive_put_in_downloads_by_hand_is_checked_before_it_is_extracted(
    serve, tmp_path, capsys
):
    # hostile pass 38: a file already in DIR/downloads/ was extracted unchecked (a traceback)
    server, _ = serve("cifar10")
    (tmp_path / "downloads").mkdir()
    (tmp_path / download.STATE).write_text('{"name": "cifar10", "extracted": [], "spec": null}')
    (tmp_path / "downloads" / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    assert main(["data", "get", "cifar10", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cifar-10-python.tar.gz is not the archive expected (MD5" in err  # fmt: skip
    assert (tmp_path / "downloads" / "cifar-10-python.tar.gz").read_bytes() == b"garbage"


def test_a_folder_holding_anything_else_is_refused_untouched(serve, tmp_path, capsys):
    server, _ = serve("cifar10")
    (tmp_path / "mine.txt").write_text("precious")
    assert main(["data", "get", "cifar10", "--to", str(tmp_path)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"] and server.ranges == []
    download.get("cifar10", tmp_path / "c10", quiet=True)
    with pytest.raises(UserError, match="holds the dataset 'cifar10'"):
        download.get("pets", tmp_path / "c10")


def test_an_unreachable_server_is_one_line(monkeypatch, tmp_path, capsys):
    standard = download.STANDARD["cifar10"]
    gone = (download.Resource("http://127.0.0.1:9/cifar-10-python.tar.gz", "0" * 32),)
    monkeypatch.setitem(download.STANDARD, "cifar10", dataclasses.replace(standard, resources=gone))
    assert main(["data", "get", "cifar10", "--to", str(tmp_path / "d" / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach http://127.0.0.1:9/" in err
    assert list(tmp_path.iterdir()) == []  # offline: no empty folders left behind
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")  # a folder of the user's: kept as it was
    assert main(["data", "get", "cifar10", "--to", str(tmp_path / "d" / "e")]) == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["d", "mine.txt"]


def test_unknown_name_is_refused_before_touching_disk(tmp_path, capsys):
    assert main(["data", "get", "cifar-10", "--to", str(tmp_path / "d")]) == 2
    assert "unknown dataset 'cifar-10' (known: cifar10," in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_to_that_is_no_folder_or_a_damaged_record_is_one_line(serve, tmp_path, capsys):
    server, _ = serve("cifar10")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "damaged").mkdir()
    record = tmp_path / "damaged" / download.STATE
    for to, text in (("/dev/null", None), ("file", None), ("damaged", "{bad"), ("damaged", "[1]")):
        if text is not None:
            record.write_text(text)
        assert main(["data", "get", "cifar10", "--to", str(tmp_path / to)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert ("is not a folder" if text is None else "is not a readable download record") in err
    assert (tmp_path / "file").read_text() == "mine" and record.read_text() == "[1]"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["damaged", "file", download.STATE]
    )
    assert server.ranges == []
