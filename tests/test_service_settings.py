"""Settings from the environment, their validators, and the τ-sweep lookup."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from modelpack.backend import RunnerOptions
from modelpack.manifest import load_manifest
from modelpack.sweep import expected_at
from service.settings import Settings, get_settings
from tests.conftest import make_app


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CPCNN_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("CPCNN_PORT", "9001")
    monkeypatch.setenv("CPCNN_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("CPCNN_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("CPCNN_MAX_FILES", "4")
    monkeypatch.setenv("CPCNN_TAU", "0.25")
    s = Settings()
    assert s.model_dir == tmp_path and s.port == 9001 and s.max_files == 4 and s.tau == 0.25
    assert s.providers == ["CPUExecutionProvider"]
    assert s.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())


def test_get_settings_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("CPCNN_MODEL_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


def test_empty_admin_token_disables_admin(tmp_path):
    assert Settings(model_dir=tmp_path, admin_token="").admin_token is None
    assert Settings(model_dir=tmp_path).admin_token is None


def test_missing_model_dir_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(model_dir=tmp_path / "nope")


@pytest.mark.parametrize("field, value", [("tau", 1.5), ("tau", float("nan")), ("max_files", 0),
                                          ("port", 0), ("default_top_k", 0),
                                          ("providers", "NoSuchExecutionProvider"),
                                          ("log_level", "LOUD"), ("intra_op_threads", -1),
                                          ("backend", "tensorrt"), ("precision", "fp8")])
def test_unsafe_values_are_refused(tmp_path, field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(model_dir=tmp_path, **{field: value})


def test_the_runner_options_come_from_the_settings_once(monkeypatch, synthetic_package):
    """What a user decides (backend, precision, threads, providers) reaches the runner through
    one options object; what was tuned on one machine stays the runner's own default."""
    monkeypatch.setenv("CPCNN_INTRA_OP_THREADS", "1")
    monkeypatch.setenv("CPCNN_PROVIDERS", "CPUExecutionProvider")
    app, _ = make_app(synthetic_package)
    with TestClient(app):
        options = app.state.service.runner.options
        assert options == RunnerOptions(backend="onnxruntime", precision="auto", threads=1,
                                        providers=("CPUExecutionProvider",))
        assert app.state.service.runner.heads_at_once_flops == RunnerOptions.heads_at_once_mflops * 1e6


def test_settings_tuned_on_one_machine_are_gone(monkeypatch, synthetic_package, caplog):
    """The head pool, the shared thread pool, spinning and the inline switch were constants
    measured on a 2-core machine (bench/README.md): setting them now only draws the warning for
    unknown variables."""
    monkeypatch.setenv("CPCNN_SHARED_THREAD_POOL", "true")
    monkeypatch.setenv("CPCNN_HEAD_WORKERS", "1")
    app, _ = make_app(synthetic_package)
    with caplog.at_level("WARNING", logger="service.app"), TestClient(app):
        pass
    assert "CPCNN_HEAD_WORKERS" in caplog.text and "CPCNN_SHARED_THREAD_POOL" in caplog.text


def test_sweep_lookup(synthetic_package):
    m = load_manifest(synthetic_package)
    rows = m.tau_sweep
    e = expected_at(m, rows[1].tau)
    assert e.method == "exact" and e.top1 == rows[1].top1
    mid = rows[1].tau + 0.25 * (rows[2].tau - rows[1].tau)
    e = expected_at(m, mid)
    assert e.method == "interpolated" and e.sweep_taus == (rows[1].tau, rows[2].tau)
    assert e.mean_heads == pytest.approx(rows[1].mean_heads + 0.25 * (rows[2].mean_heads
                                                                      - rows[1].mean_heads))
    partial = m.model_copy(update={"tau_sweep": rows[2:4]})
    assert expected_at(partial, 0.0).method == "nearest"
    assert expected_at(partial, 0.0).top1 == rows[2].top1
    assert expected_at(m.model_copy(update={"tau_sweep": []}), 0.5) is None


def test_service_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, service.app, service.__main__; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
