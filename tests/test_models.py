"""load_model: the embedded default, saved tiny folders of each architecture, offline errors."""

import pytest
import torch

import tiny_models
from gfwsvd_core.models import TASK_NAMES, default_layers, load_model


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
    with pytest.raises(ValueError, match="offline"):
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
