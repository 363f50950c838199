"""load_model: the embedded default, saved tiny folders of each architecture, offline errors."""

import json
import pytest
import torch

import tiny_models
from gfwsvd_core.errors import ModelLoadError
from gfwsvd_core.models import default_layers, load_model
from gfwsvd_core.tasks import TASKS as TASK_NAMES


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": tiny_models.save_tiny(tiny_models.tiny_gpt2(), root / "gpt2"),
        "llama": tiny_models.save_tiny(tiny_models.tiny_llama(), root / "llama"),
        "bert-cls": tiny_models.save_tiny(tiny_models.tiny_bert(num_labels=3), root / "bert-cls"),
    }


def test_default_model_is_minilm_retrieval():
    b = load_model("default", device="cpu")
    assert b.task == "retrieval" and type(b.model).__name__ == "BertModel"
    assert not b.model.training and b.source == "default"
    assert next(b.model.parameters()).dtype == torch.float32
    layers = default_layers(b.model)
    assert len(layers) == 36 and not any("pooler" in n for n in layers)


@pytest.mark.parametrize("kind,task,cls", [
    ("gpt2", "causal-lm", "GPT2LMHeadModel"),
    ("llama", "causal-lm", "LlamaForCausalLM"),
    ("bert-cls", "classification", "BertForSequenceClassification"),
])
def test_task_inferred_from_architecture(folders, monkeypatch, kind, task, cls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = load_model(str(folders[kind]), device="cpu")
    assert b.task == task and type(b.model).__name__ == cls and not b.model.training
    names = default_layers(b.model)
    assert names and not any(h in n for n in names for h in ("lm_head", "classifier", "score", "pooler"))
    if task == "causal-lm":
        assert b.tokenizer.pad_token is not None and b.tokenizer.padding_side == "right"


def test_explicit_task_overrides(folders):
    b = load_model(str(folders["bert-cls"]), task="retrieval", device="cpu")
    assert b.task == "retrieval" and type(b.model).__name__ == "BertModel"


def test_unknown_task():
    with pytest.raises(ValueError, match="valid tasks: " + ", ".join(TASK_NAMES)):
        load_model("default", task="translation")


def test_bogus_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not available offline") as e:
        load_model("no-such-user-xyz/no-such-model")
    assert e.value.__suppress_context__


def test_folder_without_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_remote_code_is_refused_with_its_own_message(tmp_path, monkeypatch):
    """A config whose class lives in the repository's own code: never run, never prompted."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "my-custom-arch", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                     "AutoModel": "modeling_custom.CustomModel"}}))
    (tmp_path / "configuration_custom.py").write_text("raise SystemExit('remote code was executed')\n")
    with pytest.raises(ModelLoadError, match="custom code") as e:
        load_model(str(tmp_path))
    assert "offline" not in str(e.value)


def test_invalid_local_config_is_a_user_error(tmp_path, monkeypatch):
    """Hidden size 32 with 5 heads: transformers' validation error becomes a one-line user error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_models.tiny_bert().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(hidden_size=32, num_attention_heads=5)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="invalid or unsupported configuration"):
        load_model(str(tmp_path))


def test_folder_without_weights_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_models.tiny_bert().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path))


def test_causal_tokenizer_gets_pad_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_models.tiny_gpt2().save_pretrained(tmp_path)
    tok = tiny_models.tokenizer()
    tok.pad_token = None
    tok.padding_side = "left"
    tok.save_pretrained(tmp_path)
    b = load_model(str(tmp_path), device="cpu")
    assert b.tokenizer.pad_token == b.tokenizer.unk_token and b.tokenizer.padding_side == "right"
