"""Storage that cannot be reached (no server at the endpoint) is one paragraph and exit 2 from
every command that takes an s3:// URL, never a traceback, and leaves no run folder behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.test_remote import forget_connections, free_port
from tests.test_remote_trust import extract_args, train_args

pytest.importorskip("s3fs")
runner = CliRunner()


@pytest.fixture
def unreachable(monkeypatch, tmp_path):
    """An endpoint where nothing listens; botocore asked to try once."""
    url = f"http://127.0.0.1:{free_port()}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
                 "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
                 "PIPELINE_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(k, v)
    forget_connections()
    yield url
    forget_connections()


@pytest.mark.parametrize("command", ["inspect", "verify", "train", "extract"])
def test_unreachable_storage_is_one_paragraph_and_exit_2(command, unreachable, tiny_model,
                                                         corpus, tmp_path):
    cache = "s3://caches/nowhere"
    args = {"inspect": ["inspect", cache], "verify": ["verify", cache],
            "train": train_args(cache, tmp_path / "run"),
            "extract": extract_args(cache, tiny_model, corpus)}[command]
    r = runner.invoke(__import__("pipeline.cli", fromlist=["app"]).app, args)
    assert r.exit_code == 2, (r.output, r.exception)
    text = r.output
    assert "Traceback" not in text and text.startswith("error: ")
    assert "s3://caches/nowhere" in text and unreachable in text, text
    assert "AWS_ENDPOINT_URL" in text and "credentials" in text, text
    assert not (tmp_path / "run").exists()


def test_the_hint_fits_the_storage_and_a_full_local_disk(monkeypatch, tmp_path):
    """gs:// was told to check AWS variables, and a full local disk to check the network."""
    import errno

    from pipeline.errors import PipelineError
    from pipeline.remote import Mirror, _hint

    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    gs = _hint("gs://bucket/cache", ConnectionError("refused"))
    assert "GOOGLE_APPLICATION_CREDENTIALS" in gs and "AWS" not in gs
    assert "AWS_ACCESS_KEY_ID" in _hint("s3://bucket/cache", ConnectionError("refused"))
    mirror = Mirror("memory://bucket/cache")
    with pytest.raises(PipelineError) as e, mirror._storage("download"):
        raise OSError(errno.ENOSPC, "No space left on device")
    text = str(e.value)
    assert "is full" in text and str(tmp_path / "home") in text and "AWS" not in text, text
