"""Tests of datasets read from http(s) URLs and `pipe:` commands (toolkit.sources).

The session's packed `tiny_dataset` is served by http.server on 127.0.0.1 and read through
`cat` commands. Every result is compared with reading the same directory as a local path.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shlex
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import toolkit.sources as sources
from toolkit.cli import app
from toolkit.config import EvalConfig, TrainConfig
from toolkit.data import build_eval_loader
from toolkit.dataset import SPLITS, DatasetError, load_dataset
from toolkit.eval import run_eval
from toolkit.sources import SourceError, open_source, read_source_bytes, source_url
from toolkit.train import train

IMAGE_SIZE = 32
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")

TINY = TrainConfig(
    arch="resnet18",
    embedding_dim=32,
    image_size=IMAGE_SIZE,
    batch_size=8,
    workers=0,
    lr=0.05,
    warmup_steps=2,
    epochs=1,
    log_every=1,
    save_every=1000,
    class_chunk=4,
    device="cpu",
    precision="fp32",
)


# ---------------------------------------------------------------------------------------------
# server and helpers


class DatasetHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a dataset folder and records each request.

    Paths in `server.missing` get a 404, and paths in `server.truncated` send a Content-Length
    header for the whole file, then half of its bytes, then close the connection.
    """

    def do_GET(self) -> None:
        relative = self.path.lstrip("/")
        if relative in self.server.missing:
            self.send_error(404)
            return
        if relative in self.server.truncated:
            data = (Path(self.directory) / relative).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_request(self, code="-", size="-") -> None:
        self.server.requests.append((self.command, self.path, int(code)))

    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tiny_dataset):
    """An http.server on 127.0.0.1 serving the tiny dataset's folder, with proxies unset."""
    handler = functools.partial(DatasetHandler, directory=str(tiny_dataset))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    httpd.missing, httpd.truncated, httpd.requests = set(), set(), []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as patch:
        for name in PROXY_VARIABLES:
            patch.delenv(name, raising=False)
        yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def server_url(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def http_root(server, server_url) -> str:
    """The dataset's URL, with no path made missing or truncated."""
    server.missing.clear()
    server.truncated.clear()
    return server_url


def pipe_root(directory: Path) -> str:
    return f"pipe:cat {shlex.quote(str(directory))}/{{}}"


@pytest.fixture(scope="module")
def trained(server_url, tmp_path_factory):
    """A one-epoch run trained from the http root: (run directory, result)."""
    run_dir = tmp_path_factory.mktemp("url-train") / "run"
    result = train(server_url, run_dir, TINY)
    return run_dir, result


def read_all(root, split: str, workers: int = 0):
    """Return (keys, labels, images, loader) of one eval pass over a split."""
    loader = build_eval_loader(load_dataset(root), split, batch_size=8, workers=workers, image_size=IMAGE_SIZE)
    batches = list(loader)
    keys = [key for batch in batches for key in batch.keys]
    labels = torch.cat([batch.labels for batch in batches])
    images = torch.cat([batch.images for batch in batches])
    return keys, labels, images, loader


def skipped_entries(loader_batches) -> list:
    return [entry for batch in loader_batches for entry in batch.skipped_samples]


def eval_settings() -> EvalConfig:
    return EvalConfig(split="test", batch_size=8, workers=0, device="cpu", precision="fp32", class_block=3)


def comparable(report) -> dict:
    """Return the report's numbers without the paths and settings, which name the root."""
    document = report.to_dict()
    for name in ("checkpoint", "dataset", "settings"):
        document.pop(name)
    return document


# ---------------------------------------------------------------------------------------------
# roots and shard URLs


def test_load_http_equals_local(http_root, tiny_dataset):
    remote = load_dataset(http_root)
    local = load_dataset(tiny_dataset)
    assert remote.root == http_root
    assert remote.classes == local.classes
    assert remote.splits == local.splits
    assert len(remote.split("train").shards) == 3
    assert remote.pack_options == local.pack_options
    assert remote.rejects == local.rejects
    assert remote.duplicates == local.duplicates


def test_load_pipe_equals_local(tiny_dataset):
    remote = load_dataset(pipe_root(tiny_dataset))
    local = load_dataset(tiny_dataset)
    assert remote.root == pipe_root(tiny_dataset)
    assert remote.classes == local.classes
    assert remote.splits == local.splits


def test_local_root_unchanged(tiny_dataset):
    dataset = load_dataset(str(tiny_dataset))
    assert dataset.root == tiny_dataset
    assert dataset.shard_urls("train") == [f"{tiny_dataset}/{shard.name}" for shard in dataset.split("train").shards]


def test_shard_urls_http(http_root):
    dataset = load_dataset(http_root + "/")
    for split in SPLITS:
        assert dataset.shard_urls(split) == [f"{http_root}/{shard.name}" for shard in dataset.split(split).shards]
    for url, shard in zip(dataset.shard_urls("train"), dataset.split("train").shards):
        assert hashlib.sha256(read_source_bytes(url)).hexdigest() == shard.sha256


def test_shard_urls_pipe(tiny_dataset):
    dataset = load_dataset(pipe_root(tiny_dataset))
    shards = dataset.split("train").shards
    assert dataset.shard_urls("train") == [f"pipe:cat {tiny_dataset}/{shard.name}" for shard in shards]
    for url, shard in zip(dataset.shard_urls("train"), shards):
        assert read_source_bytes(url) == (tiny_dataset / shard.name).read_bytes()


def test_classes_file_optional_over_http(server, http_root, tiny_dataset):
    server.missing.add("classes.txt")
    assert load_dataset(http_root).classes == load_dataset(tiny_dataset).classes


def test_source_url_forms():
    assert source_url("https://host/ds/", "train/train-000000.tar") == "https://host/ds/train/train-000000.tar"
    assert source_url("pipe:aws s3 cp s3://b/ds/{} -", "classes.txt") == "pipe:aws s3 cp s3://b/ds/classes.txt -"
    assert source_url(Path("/data/ds"), "manifest.json") == "/data/ds/manifest.json"


# ---------------------------------------------------------------------------------------------
# the loaders, train and eval read the same samples


@pytest.mark.parametrize("kind, workers", [("http", 0), ("http", 2), ("pipe", 0), ("pipe", 2)])
def test_eval_loader_same_samples(http_root, tiny_dataset, kind, workers):
    root = http_root if kind == "http" else pipe_root(tiny_dataset)
    keys, labels, images, loader = read_all(root, "train", workers)
    local_keys, local_labels, local_images, _ = read_all(tiny_dataset, "train", workers)
    assert keys == local_keys
    assert torch.equal(labels, local_labels)
    assert torch.equal(images, local_images)
    assert len(keys) == 41
    assert loader.skipped == 0


def test_train_from_http(server, trained, tiny_dataset):
    run_dir, result = trained
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [record for record in records if record["kind"] == "train"]
    val_records = [record for record in records if record["kind"] == "val"]
    assert result["step"] == load_dataset(tiny_dataset).split("train").samples // TINY.batch_size
    assert len(train_records) == result["step"]
    assert val_records[-1]["samples"] == load_dataset(tiny_dataset).split("val").samples
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "config.toml").is_file()
    assert {method for method, _, _ in server.requests} == {"GET"}
    assert ("GET", "/train/train-000000.tar", 200) in server.requests


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_run_eval_same_metrics(trained, http_root, tiny_dataset, kind):
    checkpoint = trained[0] / "checkpoints" / "last.pt"
    root = http_root if kind == "http" else pipe_root(tiny_dataset)
    remote = run_eval(checkpoint, root, eval_settings())
    local = run_eval(checkpoint, tiny_dataset, eval_settings())
    assert remote.dataset == root
    assert remote.overall()["samples"] == 15
    assert comparable(remote) == comparable(local)


def test_cli_eval_http(trained, http_root):
    checkpoint = trained[0] / "checkpoints" / "last.pt"
    arguments = ["eval", str(checkpoint), http_root, "--split", "test", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, arguments + ["--precision", "fp32"])
    assert result.exit_code == 0, result.output


def test_cli_missing_local_dataset(trained, tmp_path):
    checkpoint = trained[0] / "checkpoints" / "last.pt"
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(tmp_path / "nowhere"), "--device", "cpu"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "not found; DATASET must be a directory written by `toolkit pack`" in output


# ---------------------------------------------------------------------------------------------
# errors


def test_manifest_404_names_url(http_root):
    with pytest.raises(DatasetError) as info:
        load_dataset(f"{http_root}/elsewhere")
    message = str(info.value)
    assert f"{http_root}/elsewhere/manifest.json" in message
    assert "HTTP 404" in message


def test_pipe_root_without_placeholder(tiny_dataset):
    with pytest.raises(DatasetError) as info:
        load_dataset(f"pipe:cat {tiny_dataset}/manifest.json")
    message = str(info.value)
    assert "has no {}" in message
    assert "pipe:cat /mnt/dataset/{}" in message


def test_unsupported_scheme_suggests_pipe():
    with pytest.raises(DatasetError, match=r"pipe:aws s3 cp s3://bucket/ds/\{\} -"):
        load_dataset("s3://bucket/ds")


def test_unsafe_shard_name_rejected(tmp_path, tiny_dataset):
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    manifest["splits"]["test"]["shards"][0]["name"] = "test/x;touch pwned.tar"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(tiny_dataset / "classes.txt", tmp_path / "classes.txt")
    with pytest.raises(DatasetError, match="invalid file name 'test/x;touch pwned.tar'"):
        load_dataset(pipe_root(tmp_path))
    assert not (tmp_path / "pwned.tar").exists()


@pytest.mark.timeout(60)
def test_missing_shard_http_skipped(server, http_root, tiny_dataset):
    shard = load_dataset(tiny_dataset).split("train").shards[1]
    server.missing.add(shard.name)
    loader = build_eval_loader(load_dataset(http_root), "train", batch_size=8, workers=0, image_size=IMAGE_SIZE)
    batches = list(loader)
    keys = [key for batch in batches for key in batch.keys]
    entries = skipped_entries(batches)
    local_keys, _, _, _ = read_all(tiny_dataset, "train")
    assert loader.skipped == shard.samples
    assert len(keys) == 41 - shard.samples
    assert set(keys) < set(local_keys)
    assert [entry.shard for entry in entries] == [shard.name]
    assert f"{http_root}/{shard.name}" in entries[0].reason
    assert "HTTP 404" in entries[0].reason


@pytest.mark.timeout(60)
def test_truncated_shard_http_skipped(server, http_root, tiny_dataset):
    shard = load_dataset(tiny_dataset).split("train").shards[0]
    server.truncated.add(shard.name)
    loader = build_eval_loader(load_dataset(http_root), "train", batch_size=8, workers=0, image_size=IMAGE_SIZE)
    batches = list(loader)
    keys = [key for batch in batches for key in batch.keys]
    entries = skipped_entries(batches)
    assert 0 < loader.skipped < shard.samples
    assert len(keys) + loader.skipped == 41
    assert [entry.shard for entry in entries] == [shard.name]
    assert f"{http_root}/{shard.name}" in entries[0].reason
    assert "closed after" in entries[0].reason


@pytest.mark.timeout(60)
def test_failed_pipe_shard_skipped(tmp_path, tiny_dataset):
    copy = shutil.copytree(tiny_dataset, tmp_path / "copy")
    shard = load_dataset(copy).split("train").shards[2]
    (copy / shard.name).unlink()
    loader = build_eval_loader(load_dataset(pipe_root(copy)), "train", batch_size=8, workers=0, image_size=IMAGE_SIZE)
    batches = list(loader)
    entries = skipped_entries(batches)
    assert loader.skipped == shard.samples
    assert sum(len(batch) for batch in batches) == 41 - shard.samples
    assert [entry.shard for entry in entries] == [shard.name]
    assert f"cat {copy}/{shard.name}" in entries[0].reason
    assert "exited with status 1" in entries[0].reason


def test_failed_command_raises_oserror():
    with pytest.raises(OSError) as info:
        read_source_bytes("pipe:echo 'disk on fire' >&2; exit 3")
    message = str(info.value)
    assert "echo 'disk on fire' >&2; exit 3" in message
    assert "exited with status 3" in message
    assert message.endswith(": disk on fire")
    assert info.value.status == 3


@pytest.mark.timeout(30)
def test_early_close_stops_command():
    source = open_source("pipe:yes")
    data = source.read(64)
    source.close()
    assert data.startswith(b"y\ny\n")
    assert source.process.returncode is not None


@pytest.mark.timeout(30)
def test_stalled_server_times_out(monkeypatch):
    monkeypatch.setattr(sources, "HTTP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(sources, "HTTP_RETRY_DELAY_S", 0.0)
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections into the backlog but never sends a response
        url = "http://127.0.0.1:{}/manifest.json".format(listener.getsockname()[1])
        with pytest.raises(SourceError) as info:
            read_source_bytes(url)
    message = str(info.value)
    assert url in message
    assert "timed out" in message
    assert f"gave up after {sources.HTTP_ATTEMPTS} tries" in message

