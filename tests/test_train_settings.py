"""Train settings added after runs were saved: recorded in train_config.json, and an older run
without them still resumes."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import PipelineError


def test_tf32_is_a_recorded_setting_and_old_runs_without_it_resume(tmp_path):
    """--tf32 is saved in train_config.json; a run saved before the setting existed resumes
    (its missing key reads as the default, off), and --tf32 on such a run is a changed setting."""
    from cache_schema.synthetic import write_synthetic_cache
    from pipeline.train.config import TrainConfig
    from pipeline.train.trainer import train

    cache = tmp_path / "cache"
    write_synthetic_cache(cache, n_chunks=2, rows_per_chunk=256, d_model=16)
    kw = dict(cache=str(cache), out=str(tmp_path / "run"), expansion=2, batch_size=64, steps=8,
              log_every=4, checkpoint_every=4, device="cpu", progress=False)
    train(TrainConfig.from_flat(**kw))
    saved = tmp_path / "run" / "train_config.json"
    config = json.loads(saved.read_text())
    assert config["tf32"] is False
    del config["tf32"]  # as a run saved before the setting existed
    saved.write_text(json.dumps(config))
    train(TrainConfig.from_flat(**kw, resume=True))
    with pytest.raises(PipelineError, match="tf32"):
        train(TrainConfig.from_flat(**kw, resume=True, tf32=True))
