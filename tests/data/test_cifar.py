"""CIFAR-10 / CIFAR-100 builtins: torchvision's archive format (a tiny one written here), downloaded from a server on
127.0.0.1 with its md5 checked, written once as an ImageFolder; offline and wrong files say where a copy goes."""
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image

from mdeq.data.cifar import CifarDownloadError, cifar_archive, default_cifar_root, prepare_cifar
from mdeq.data.factory import build_classification_datasets, classification_root

def _archive(name, path, seed=0):
    """A tiny archive in torchvision's layout: the class's base folder with its train/test batch files and meta."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    labels_key, names_key, n_classes = (("labels", "label_names", 10) if name == "cifar10"
                                        else ("fine_labels", "fine_label_names", 100))
    rng = np.random.default_rng(seed)
    members, truth = {}, {"train": [], "val": []}
    for split, files in (("train", cls.train_list), ("val", cls.test_list)):
        for member, _ in files:  # every class in every file, in a shuffled order
            data = rng.integers(0, 256, (n_classes, 3072), dtype=np.uint8)
            labels = rng.permutation(n_classes).tolist()
            members[member] = {"data": data, labels_key: labels}
            truth[split] += list(zip(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels))
    members[cls.meta["filename"]] = {names_key: [f"class{i}" for i in range(n_classes)]}
    with tarfile.open(path, "w:gz") as tar:
        for member, obj in members.items():
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"{cls.base_folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return hashlib.md5(path.read_bytes()).hexdigest(), truth


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MDEQ_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def served(tmp_path):
    """A file server on 127.0.0.1 over tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_downloaded_once_checked_and_written_as_an_imagefolder(name, cache, served, monkeypatch):
    www, base = served
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    md5, truth = _archive(name, www / cls.filename)
    monkeypatch.setattr(cls, "url", f"{base}/{cls.filename}")
    monkeypatch.setattr(cls, "tgz_md5", md5)
    root = classification_root({"name": name})
    assert root == default_cifar_root(name) and (root / ".complete").is_file()
    assert (cache / "downloads" / cls.filename).is_file()
    train, val = build_classification_datasets({"name": name})
    n_classes = 10 if name == "cifar10" else 100
    assert len(train) == n_classes * len(cls.train_list) and len(val) == n_classes
    assert train.classes[:2] == ["class0", "class1"] and len(train.classes) == n_classes
    for split, ds in (("train", train), ("val", val)):  # every image and label read back as written
        got = sorted((np.asarray(Image.open(p)).tobytes(), ds.classes[t]) for p, t in ds.samples)
        assert len(got) == len(truth[split])
        want = sorted((img.tobytes(), f"class{label}") for img, label in truth[split])
        assert got == want
    (www / cls.filename).unlink()  # the second time nothing is fetched
    assert prepare_cifar(name) == root


def test_a_hand_placed_archive_works_offline_and_a_wrong_one_is_named(cache, tmp_path, monkeypatch):
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens there
    with pytest.raises(CifarDownloadError) as err:
        prepare_cifar("cifar10")
    message = str(err.value)
    assert "could not download cifar10" in message and str(cache / "downloads" / cls.filename) in message
    assert "MDEQ_DATA" in message and cls.tgz_md5 in message
    assert not default_cifar_root("cifar10").exists() and not (cache / "downloads" / cls.filename).exists()
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    md5, _ = _archive("cifar10", cache / "downloads" / cls.filename)
    with pytest.raises(CifarDownloadError, match="md5 differs.*delete it"):  # not the real archive's checksum
        cifar_archive("cifar10")
    monkeypatch.setattr(cls, "tgz_md5", md5)
    assert (prepare_cifar("cifar10") / "val").is_dir()


def test_an_own_imagefolder_export_is_used_as_it_is(tmp_path):
    own = tmp_path / "exported"
    for split in ("train", "val"):
        (own / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(own / split / "cat" / "0.png")
    assert classification_root({"name": "cifar10", "root": str(own)}) == own
