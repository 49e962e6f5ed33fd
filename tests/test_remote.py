"""Caches on S3 (a moto server on 127.0.0.1, never a real cloud): extract to s3://, train and
eval from it through the local read-through mirror, same bytes as a local cache."""

from __future__ import annotations

import os
import socket

import pytest

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "PIPELINE_HOME": str(tmp_path_factory.mktemp("home"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    forget_connections()
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("caches"):  # moto's buckets outlive a server: another module's fixture
        fs.mkdir("caches")
    yield "s3://caches"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    forget_connections()
    server.stop()


def forget_connections() -> None:
    """Drop cached filesystems and mirrors: they hold the endpoint of the server they met."""
    import s3fs

    from pipeline import remote

    s3fs.S3FileSystem.clear_instance_cache()
    for m in remote._MIRRORS.values():
        m.release()
    remote._MIRRORS.clear()


def settings(model, corpus, out) -> dict:
    return {"out": str(out), "model": str(model), "corpus": str(corpus), "layers": [1],
            "tokens": 1024, "context_length": 32, "rows_per_chunk": 256, "batch_size": 4,
            "device": "cpu"}


def test_extract_to_s3_then_train_and_eval_from_it(bucket, tiny_model, corpus, tmp_path):
    from pipeline.eval.config import EvalConfig
    from pipeline.eval.run import evaluate
    from pipeline.extract.config import ExtractConfig
    from pipeline.extract.run import extract
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import train

    url = f"{bucket}/tiny"
    remote = extract(ExtractConfig(**settings(tiny_model, corpus, url)), progress=False)
    local = extract(ExtractConfig(**settings(tiny_model, corpus, tmp_path / "local")),
                    progress=False)
    assert remote.cache_id == local.cache_id and remote.status == "complete"
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = {p.split("/tiny/", 1)[1] for p in fs.find("caches/tiny")}
    local_names = {str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*")
                   if p.is_file() and p.name != ".lock"}  # the writer's lock stays local
    assert names == local_names
    for name in ("zarr.json", "clean/blocks.1.hook_resid_post/c/3/0", "_chunks/00000002.json"):
        assert fs.cat(f"caches/tiny/{name}") == (tmp_path / "local" / name).read_bytes()

    common = {"layer": 1, "steps": 12, "batch_size": 32, "log_every": 4, "checkpoint_every": 4,
              "device": "cpu", "progress": False, "holdout_chunks": 1}
    train(TrainConfig.from_flat(cache=url, out=str(tmp_path / "from-s3"), **common))
    train(TrainConfig.from_flat(cache=str(tmp_path / "local"), out=str(tmp_path / "from-local"), **common))
    assert (tmp_path / "from-s3" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "from-local" / "sae_weights.safetensors").read_bytes()
    result = evaluate(EvalConfig(tmp_path / "from-s3", ce_sequences=0, device="cpu", progress=False))
    assert result["cache_id"] == local.cache_id and result["tokens"] > 0


def test_a_missing_remote_cache_is_a_clear_error(bucket, tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import train

    with pytest.raises(PipelineError, match="no cache at s3://caches/nothing"):
        train(TrainConfig.from_flat(cache=f"{bucket}/nothing", out=str(tmp_path / "r"), device="cpu"))
