"""The GPU XLA flag preset (on CPU: a fake plugin and a mocked probe; one real probe) and the
persistent compilation cache switch."""

import json
import logging

import pytest

from lmjax import xla_setup


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA plugin and a device present; each probe call recorded, rejecting `bad` flags."""
    monkeypatch.setattr(xla_setup, "cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(xla_setup, "gpu_device_present", lambda: True)
    probes, bad = [], {"--xla_gpu_enable_triton_gemm=false"}

    def probe(flags):
        probes.append(list(flags))
        return not bad & set(flags)

    monkeypatch.setattr(xla_setup, "probe", probe)
    return probes


def test_preset_applied_on_gpu_without_the_flag_the_probe_rejects(fake_gpu, tmp_path, caplog):
    environ = {}
    with caplog.at_level(logging.WARNING, logger="lmjax.xla_setup"):
        flags = xla_setup.apply_gpu_preset(environ, tmp_path / "cache.json")
    expected = [f for f in xla_setup.GPU_PRESET if f != "--xla_gpu_enable_triton_gemm=false"]
    assert flags == expected and environ["XLA_FLAGS"] == " ".join(expected)
    assert "--xla_gpu_enable_triton_gemm=false" in caplog.text
    assert fake_gpu[0] == list(xla_setup.GPU_PRESET) and len(fake_gpu) == 1 + len(xla_setup.GPU_PRESET)
    verdicts = next(iter(json.loads((tmp_path / "cache.json").read_text()).values()))
    assert verdicts["--xla_gpu_enable_triton_gemm=false"] is False
    fake_gpu.clear()  # a second start reads the cached verdicts
    assert xla_setup.apply_gpu_preset({}, tmp_path / "cache.json") == expected and fake_gpu == []


def test_users_xla_flags_are_never_overridden(fake_gpu, tmp_path):
    for own in ("--xla_dump_to=/tmp/hlo", ""):
        environ = {"XLA_FLAGS": own}
        assert xla_setup.apply_gpu_preset(environ, tmp_path / "cache.json") == []
        assert environ == {"XLA_FLAGS": own}
    assert fake_gpu == []


def test_no_preset_without_a_gpu_backend(monkeypatch, fake_gpu, tmp_path):
    assert xla_setup.apply_gpu_preset({"JAX_PLATFORMS": "cpu"}, tmp_path / "c.json") == []
    monkeypatch.setattr(xla_setup, "cuda_plugin_installed", lambda: False)
    environ = {}
    assert xla_setup.apply_gpu_preset(environ, tmp_path / "c.json") == [] and environ == {}
    assert fake_gpu == []


def test_real_probe_rejects_a_flag_this_jaxlib_does_not_know():
    assert xla_setup.probe(["--xla_gpu_enable_latency_hiding_scheduler=true"])
    assert not xla_setup.probe(["--xla_gpu_graph_level=0"])


def test_compilation_cache_switch(tmp_path):
    import jax

    before = jax.config.jax_compilation_cache_dir
    xla_setup.enable_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == before
    try:
        xla_setup.enable_compilation_cache(str(tmp_path))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
