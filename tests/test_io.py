"""Saving/loading compressed models: round trips, dense export, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

from gfwsvd_core.factorized import LowRankLinear, replace_layer
from gfwsvd_core.io import (
    FORMAT_VERSION,
    CompressedFormatError,
    export_dense,
    load_compressed,
    load_tokenizer,
    save_compressed,
)
from gfwsvd_core.layers import weight_shape
from tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, tokenizer

CASES = {
    "bert": (
        tiny_bert,
        BertModel,
        {"encoder.layer.0.attention.self.query": 3, "encoder.layer.0.output.dense": 5, "encoder.layer.1.intermediate.dense": 4},
    ),
    "gpt2": (
        tiny_gpt2,
        GPT2LMHeadModel,
        {"transformer.h.0.attn.c_attn": 6, "transformer.h.0.mlp.c_proj": 3, "transformer.h.1.mlp.c_fc": 4},
    ),
    "llama": (
        tiny_llama,
        LlamaForCausalLM,
        {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.gate_proj": 3, "model.layers.1.mlp.down_proj": 5},
    ),
}


def _compress(kind: str):
    build, _, ranks = CASES[kind]
    model = build()
    gen = torch.Generator().manual_seed(7)
    for name, r in ranks.items():
        dense = model.get_submodule(name)
        m, n = weight_shape(dense)
        up = torch.randn(m, r, generator=gen) / r**0.5
        down = torch.randn(r, n, generator=gen) / n**0.5
        replace_layer(model, name, LowRankLinear.replacing(dense, up, down))
    return model.eval()


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def compressed():
    return {kind: _compress(kind) for kind in CASES}


@pytest.fixture(scope="module")
def saved_gpt2(compressed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "export"
    return save_compressed(compressed["gpt2"], folder, method="svd", source_model="tiny-gpt2")


@pytest.mark.parametrize("kind", list(CASES))
def test_round_trip_identical_outputs_and_ranks(kind, compressed, ids, tmp_path):
    model = compressed[kind]
    folder = save_compressed(model, tmp_path / kind, method="gfwsvd", source_model=f"tiny-{kind}",
                             calibration={"texts": 4, "seed": 0}, extra={"note": "test"})
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    block = config["gfwsvd"]
    assert config["_name_or_path"] == f"tiny-{kind}"  # the source, not a local path
    assert block["format_version"] == FORMAT_VERSION and block["method"] == "gfwsvd"
    assert block["ranks"] == CASES[kind][2] and block["model_class"] == type(model).__name__
    assert block["calibration"] == {"texts": 4, "seed": 0} and block["note"] == "test"
    assert "load_compressed" in (folder / "README.md").read_text()

    loaded = load_compressed(folder)
    assert not loaded.training and type(loaded) is type(model)
    got = {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert got == CASES[kind][2]
    for name in got:
        assert loaded.get_submodule(name).dense_type == model.get_submodule(name).dense_type
    assert (_output(loaded, ids) - _output(model, ids)).abs().max().item() <= 1e-6


def test_gpt2_tied_head_is_stored_once_and_retied(saved_gpt2, compressed):
    block = json.loads((saved_gpt2 / "config.json").read_text())["gfwsvd"]
    assert block["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert set(block["dense_types"].values()) == {"conv1d"}
    assert "lm_head.weight" not in load_file(str(saved_gpt2 / "model.safetensors"))
    loaded = load_compressed(saved_gpt2)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_bert_without_pooler_and_tokenizer(compressed, tmp_path):
    tok = tokenizer()
    folder = save_compressed(compressed["bert"], tmp_path / "bert", tokenizer=tok)
    loaded = load_compressed(folder, dtype=torch.float64)
    assert loaded.pooler is None
    assert loaded.encoder.layer[0].output.dense.up.weight.dtype == torch.float64
    assert load_tokenizer(folder)("hello world")["input_ids"] == tok("hello world")["input_ids"]
    assert load_tokenizer(tmp_path / "nothing_here") is None


@pytest.mark.parametrize("kind", list(CASES))
def test_export_dense_loads_with_plain_from_pretrained(kind, compressed, ids, tmp_path):
    model = compressed[kind]
    folder = export_dense(model, tmp_path / f"{kind}-dense")
    assert "gfwsvd" not in json.loads((folder / "config.json").read_text())
    plain = CASES[kind][1].from_pretrained(str(folder)).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    assert any(isinstance(m, LowRankLinear) for m in model.modules())  # the original is untouched
    assert (_output(plain, ids) - _output(model, ids)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- errors


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CompressedFormatError, match="does not exist"):
        load_compressed(tmp_path / "nope")


def test_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressedFormatError, match="no config.json"):
        load_compressed(tmp_path / "empty")


def test_plain_save_pretrained_folder(tmp_path):
    tiny_llama().save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(CompressedFormatError, match="not a gfwsvd export.*from_pretrained"):
        load_compressed(tmp_path / "plain")


def test_unsupported_format_version(saved_gpt2, tmp_path):
    folder = _copy(saved_gpt2, tmp_path / "v99")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["gfwsvd"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressedFormatError, match="format_version 99"):
        load_compressed(folder)


def test_missing_weights(saved_gpt2, tmp_path):
    folder = _copy(saved_gpt2, tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CompressedFormatError, match="no model.safetensors"):
        load_compressed(folder)


@pytest.mark.parametrize("damage", ["half", "garbage"])
def test_truncated_or_corrupt_weights(damage, saved_gpt2, tmp_path):
    folder = _copy(saved_gpt2, tmp_path / damage)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "half" else b"\x00\xff" * 64)
    with pytest.raises(CompressedFormatError, match="truncated or corrupt"):
        load_compressed(folder)


def _tamper(saved: Path, dst: Path, edit) -> Path:
    folder = _copy(saved, dst)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    return folder


def test_tampered_renamed_tensor(saved_gpt2, tmp_path):
    def rename(t):
        t["transformer.h.0.mlp.c_proj.up.weight_x"] = t.pop("transformer.h.0.mlp.c_proj.up.weight")

    with pytest.raises(CompressedFormatError, match="lacks 1 expected tensors: 'transformer.h.0.mlp.c_proj.up.weight'"):
        load_compressed(_tamper(saved_gpt2, tmp_path / "renamed", rename))


def test_tampered_extra_tensor(saved_gpt2, tmp_path):
    def add(t):
        t["transformer.h.0.extra"] = torch.zeros(3)

    with pytest.raises(CompressedFormatError, match="1 unexpected tensors: 'transformer.h.0.extra'"):
        load_compressed(_tamper(saved_gpt2, tmp_path / "extra", add))


def test_tampered_wrong_shape(saved_gpt2, tmp_path):
    def reshape(t):
        t["transformer.h.1.mlp.c_proj.weight"] = torch.zeros(3, 3)

    with pytest.raises(CompressedFormatError, match="wrong shape: 'transformer.h.1.mlp.c_proj.weight"):
        load_compressed(_tamper(saved_gpt2, tmp_path / "shape", reshape))


def test_config_rank_edited(saved_gpt2, tmp_path):
    folder = _copy(saved_gpt2, tmp_path / "rank")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["gfwsvd"]["ranks"]["transformer.h.1.mlp.c_fc"] = 7
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressedFormatError, match="rank 7, but its tensors have rank 4"):
        load_compressed(folder)


def test_config_lists_unknown_layer(saved_gpt2, tmp_path):
    folder = _copy(saved_gpt2, tmp_path / "unknown")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["gfwsvd"]["ranks"]["transformer.h.5.mlp.c_fc"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressedFormatError, match="does not have"):
        load_compressed(folder)


def test_save_rejects_clashing_extra_and_unserialisable_calibration(compressed, tmp_path):
    with pytest.raises(ValueError, match="clash"):
        save_compressed(compressed["llama"], tmp_path / "a", extra={"ranks": {}})
    with pytest.raises(ValueError, match="JSON"):
        save_compressed(compressed["llama"], tmp_path / "b", calibration={"x": object()})


def _edit_config(saved: Path, dst: Path, edit) -> Path:
    folder = _copy(saved, dst)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["gfwsvd"])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_config_layer_dropped_from_ranks(saved_gpt2, tmp_path):
    folder = _edit_config(saved_gpt2, tmp_path / "dropped", lambda b: b["ranks"].pop("transformer.h.0.mlp.c_proj"))
    with pytest.raises(CompressedFormatError, match="missing from the ranks.*'transformer.h.0.mlp.c_proj'"):
        load_compressed(folder)


def test_missing_tensor_is_tolerated_only_when_the_architecture_ties_it(saved_gpt2, tmp_path):
    # the head weight may be absent because GPT-2 ties it; a same-shaped untied tensor may not
    def drop(t):
        del t["transformer.wpe.weight"]

    def claim_tied(block):
        block["tied"]["transformer.wpe.weight"] = "transformer.h.0.ln_1.weight"

    folder = _tamper(saved_gpt2, tmp_path / "untied", drop)
    with pytest.raises(CompressedFormatError, match="lacks 1 expected tensors: 'transformer.wpe.weight'"):
        load_compressed(folder)
    cfg = json.loads((folder / "config.json").read_text())
    claim_tied(cfg["gfwsvd"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompressedFormatError, match="does not tie them"):
        load_compressed(folder)


def test_tied_tensor_present_twice(saved_gpt2, tmp_path):
    def add_head(t):
        t["lm_head.weight"] = t["transformer.wte.weight"].clone()

    with pytest.raises(CompressedFormatError, match="holds it too"):
        load_compressed(_tamper(saved_gpt2, tmp_path / "twice", add_head))


def test_gpt2_factorised_head_round_trip_and_dense_export(ids, tmp_path):
    model = tiny_gpt2()
    w = model.lm_head.weight.detach()  # vocab x hidden, tied to wte
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    replace_layer(model, "lm_head", LowRankLinear.replacing(model.lm_head, u[:, :8] * s[:8], vh[:8]))
    ref = _output(model, ids)
    folder = save_compressed(model, tmp_path / "head")
    assert json.loads((folder / "config.json").read_text())["gfwsvd"]["tied"] == {}
    assert (folder / "generation_config.json").is_file()
    loaded = load_compressed(folder)
    assert isinstance(loaded.lm_head, LowRankLinear) and loaded.lm_head.rank == 8
    assert (_output(loaded, ids) - ref).abs().max().item() <= 1e-6
    dense_folder = export_dense(model, tmp_path / "head-dense")
    assert json.loads((dense_folder / "config.json").read_text())["tie_word_embeddings"] is False
    plain = GPT2LMHeadModel.from_pretrained(str(dense_folder)).eval()
    assert plain.lm_head.weight is not plain.transformer.wte.weight
    assert (_output(plain, ids) - ref).abs().max().item() <= 1e-5
