"""compress(): new model, input untouched, ratio 1 is a no-op, W_r substitution, ranks maps, records."""

import copy
import functools

import pytest
import torch
from torch import nn

import tiny_models
from test_stats import encoder_loss, lm_loss
from gfwsvd_core import available_methods, collect_statistics
from gfwsvd_core.methods import method_class
from gfwsvd_core.compress import build_compressed, compress, decompose_layers
from gfwsvd_core.factorized import LowRankLinear, replace_layer
from gfwsvd_core.layers import get_weight, weight_shape
from gfwsvd_core.models import default_layers
from gfwsvd_core.ranks import rank_for_ratio
from gfwsvd_core.stats import ALL_KINDS


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """See conftest.one_thread."""


def make_batch(B=4, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 2:] = 0
    mask[3, T - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


CASES = {
    "bert": (tiny_models.tiny_bert, encoder_loss),
    "gpt2": (tiny_models.tiny_gpt2, lm_loss),
    "llama": (tiny_models.tiny_llama, lm_loss),
}


@functools.lru_cache(maxsize=None)
def _setup(arch):
    build, loss_fn = CASES[arch]
    model = build()
    batches = [make_batch(seed=0), make_batch(seed=1)]
    stats = collect_statistics(model, batches, loss_fn, layers=default_layers(model), kinds=ALL_KINDS)
    return model, stats


def setup(arch):
    """A fresh copy of the tiny model (tests may not share mutations) and its statistics."""
    model, stats = _setup(arch)
    return copy.deepcopy(model), stats


def outputs(model, arch, seed=5):
    batch = make_batch(seed=seed)
    with torch.no_grad():
        out = model(**batch)
    return out.last_hidden_state if arch == "bert" else out.logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def low_rank(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.mark.parametrize("arch", list(CASES))
def test_input_model_never_modified(arch):
    model, stats = setup(arch)
    before = state(model)
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()  # the mode is not touched either
    comp = compress(model, stats, "gfwsvd", ratio=0.4)
    assert comp.model is not model
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not low_rank(model)
    # the factorised layers' tensors are new; nothing else of the original was copied
    ptrs = {p.data_ptr() for p in model.parameters()}
    for name, m in low_rank(comp.model).items():
        assert not any(p.data_ptr() in ptrs for p in m.parameters()), name
    assert all(not m.training for m in comp.model.modules())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("arch", list(CASES))
def test_ratio_one_changes_nothing(arch):
    model, stats = setup(arch)
    comp = compress(model, stats, "gfwsvd", ratio=1.0)
    assert not low_rank(comp.model)
    assert all(r is None for r in comp.ranks.values())
    assert torch.equal(outputs(model, arch), outputs(comp.model, arch))
    kept = comp.kept_ratio(model)
    assert kept["layers"] == 1.0 and kept["model"] == 1.0
    assert all(rec["dense"] and rec["params_after"] == rec["params_before"] for rec in comp.layer_records())


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("method", ["svd", "gfwsvd"])
def test_compressed_outputs_equal_wr_substitution(arch, method):
    model, stats = setup(arch)
    comp = compress(model, stats, method, ratio=0.5)
    ref = copy.deepcopy(model)
    for name, r in comp.ranks.items():
        assert r is not None
        module = ref.get_submodule(name)
        Wr = comp.decompositions[name].decomposition.reconstruct(r)  # (m, n) float64
        with torch.no_grad():
            module.weight.copy_(Wr if isinstance(module, nn.Linear) else Wr.T)
    assert set(low_rank(comp.model)) == set(comp.ranks)
    torch.testing.assert_close(outputs(comp.model, arch), outputs(ref, arch), atol=2e-5, rtol=1e-4)
    # and the low-rank layers really have the chosen ranks and the original biases
    for name, m in low_rank(comp.model).items():
        assert m.rank == comp.ranks[name]
        orig = model.get_submodule(name)
        if getattr(orig, "bias", None) is not None:
            assert torch.equal(m.up.bias, orig.bias)
        assert m.down.bias is None


def test_explicit_ranks_map():
    model, stats = setup("gpt2")
    names = list(stats)
    ranks = {names[0]: 3, names[2]: 1, names[3]: None}
    comp = compress(model, stats, "kfac", ranks=ranks)
    assert comp.ranks == ranks
    assert set(comp.decompositions) == set(ranks)
    lr = low_rank(comp.model)
    assert {n: m.rank for n, m in lr.items()} == {names[0]: 3, names[2]: 1}
    for n in names:
        if n not in lr:  # untouched layers keep their exact weights
            assert torch.equal(get_weight(comp.model.get_submodule(n)), get_weight(model.get_submodule(n)))
    recs = {r["layer"]: r for r in comp.layer_records()}
    assert recs[names[3]]["dense"] and "requested" in recs[names[3]]["reason"]
    # unknown layer names and bad ranks are errors that name the layer
    with pytest.raises(ValueError, match="no.such.layer"):
        compress(model, stats, "svd", ranks={"no.such.layer": 2})
    with pytest.raises(ValueError, match=names[0]):
        compress(model, stats, "svd", ranks={names[0]: 10_000})
    with pytest.raises(ValueError, match="exactly one"):
        compress(model, stats, "svd", ratio=0.5, ranks={names[0]: 2})
    with pytest.raises(ValueError, match="exactly one"):
        compress(model, stats, "svd")
    with pytest.raises(ValueError, match="empty"):
        compress(model, stats, "svd", ranks={})
    with pytest.raises(ValueError, match=names[5]):  # a layer with statistics but outside ``layers``
        compress(model, stats, "svd", ranks={names[5]: 2}, layers=names[:2])


def test_explicit_ranks_decompose_only_named_layers(monkeypatch):
    import gfwsvd_core.compress as C

    model, stats = setup("gpt2")
    seen = []
    real = C.decompose
    monkeypatch.setattr(C, "decompose", lambda W, *a, **k: seen.append(tuple(W.shape)) or real(W, *a, **k))
    names = list(stats)
    compress(model, stats, "svd", ranks={names[0]: 2})
    assert len(seen) == 1


def test_break_even_layer_stays_dense_and_record_says_so():
    model, stats = setup("bert")
    names = list(stats)
    square = next(n for n in names if stats[n].shape == (32, 32))  # break-even rank 16
    wide = next(n for n in names if stats[n].shape == (128, 32))  # break-even rank 25.6
    comp = compress(model, stats, "gfwsvd", ranks={square: 16, wide: 25})
    assert comp.ranks == {square: None, wide: 25}
    assert set(low_rank(comp.model)) == {wide}
    recs = {r["layer"]: r for r in comp.layer_records()}
    rec = recs[square]
    assert rec["dense"] and rec["rank"] is None and "break-even" in rec["reason"]
    assert rec["params_after"] == rec["params_before"] == 32 * 32
    assert rec["predicted_loss"] == 0.0
    assert not recs[wide]["dense"] and recs[wide]["params_after"] == 25 * 160
    # a ratio just under 1 factorises only the layers it still shrinks
    comp = compress(model, stats, "svd", ratio=0.99)
    for name, r in comp.ranks.items():
        m, n = stats[name].shape
        assert r == rank_for_ratio(m, n, 0.99)
    assert comp.ranks[square] == 15 and comp.ranks[wide] == 25  # floor(0.99 * 16), floor(0.99 * 25.6)


def test_kept_ratio_numbers():
    model, stats = setup("llama")
    comp = compress(model, stats, "svd", ratio=0.5)
    kept = comp.kept_ratio(model)
    before = after = 0
    for name, r in comp.ranks.items():
        m, n = weight_shape(model.get_submodule(name))
        assert r == rank_for_ratio(m, n, 0.5)
        before += m * n
        after += r * (m + n)
    assert kept["layer_params_before"] == before and kept["layer_params_after"] == after
    assert kept["layers"] == pytest.approx(after / before)
    assert 0.4 < kept["layers"] <= 0.5
    total = sum(p.numel() for p in model.parameters())
    assert kept["model_params_before"] == total
    assert kept["model_params_after"] == sum(p.numel() for p in comp.model.parameters())
    assert kept["model_params_after"] == total - before + after  # LLaMA layers have no bias
    assert kept["model"] == pytest.approx((total - before + after) / total)
    recs = comp.layer_records()
    assert sum(r["params_before"] for r in recs) == before
    assert sum(r["params_after"] for r in recs) == after


@pytest.mark.parametrize("arch", list(CASES))
def test_every_method_compresses(arch):
    model, stats = setup(arch)
    ref = outputs(model, arch)
    for method in available_methods():
        if getattr(method_class(method), "composite", False):  # auto: chosen on folds (tests/test_auto.py)
            with pytest.raises(ValueError, match="use pipeline.decompositions"):
                compress(model, stats, method, ratio=0.5)
            continue
        comp = compress(model, stats, method, ratio=0.5)
        assert comp.method == method
        assert set(low_rank(comp.model)) == set(stats)
        out = outputs(comp.model, arch)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        recs = comp.layer_records()
        assert len(recs) == len(stats)
        for rec in recs:
            assert rec["rank"] is not None and rec["predicted_loss"] >= 0
        # full rank reproduces the weights for every method
        name = next(iter(stats))
        d = comp.decompositions[name].decomposition
        torch.testing.assert_close(d.reconstruct(d.max_rank), get_weight(model.get_submodule(name)).double(),
                                   atol=1e-5, rtol=1e-5)


def test_decompositions_are_reused():
    model, stats = setup("gpt2")
    decs = decompose_layers(model, stats, "fwsvd")
    a = compress(model, stats, "fwsvd", ratio=0.3, decompositions=decs)
    b = compress(model, stats, "fwsvd", ratio=0.6, decompositions=decs)
    for name in decs:
        assert a.decompositions[name] is decs[name] and b.decompositions[name] is decs[name]
        assert a.ranks[name] < b.ranks[name]
    with pytest.raises(ValueError, match="no statistics"):
        decompose_layers(model, stats, "svd", layers=["transformer.wte"])
    with pytest.raises(ValueError, match="unknown method"):
        compress(model, stats, "nope", ratio=0.5)


def _storage_bytes(tensors):
    """{storage data_ptr: bytes}, each storage once."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("arch", list(CASES))
def test_untouched_tensors_are_shared_not_copied(arch):
    """A variant shares every tensor it does not replace with the original: its only new memory
    is the low-rank layers, the original stays as it was, and the outputs are those of a deep copy."""
    model, stats = setup(arch)
    names = list(stats)
    ranks = {n: (None if i % 3 == 0 else 2) for i, n in enumerate(names)}  # some layers stay dense
    decs = decompose_layers(model, stats, "gfwsvd")
    before, out_before = state(model), outputs(model, arch)  # in eval mode
    model.train()  # the original's modes are not touched
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    new = build_compressed(model, decs, ranks)
    replaced = {n for n, r in ranks.items() if r is not None}
    assert set(low_rank(new)) == replaced

    def under(key):
        return any(key.startswith(n + ".") for n in replaced)

    for key, p in new.named_parameters():
        if under(key):
            continue
        assert p.data_ptr() == params[key].data_ptr(), key  # same storage ...
        assert p is not params[key], key  # ... but the copy's own Parameter object
        assert p.requires_grad == params[key].requires_grad
    for key, b in new.named_buffers():
        assert b.data_ptr() == buffers[key].data_ptr(), key
    # memory: the bytes not shared with the original are exactly the low-rank layers'
    orig = _storage_bytes(list(model.parameters()) + list(model.buffers()))
    mine = _storage_bytes(list(new.parameters()) + list(new.buffers()))
    fresh = sum(b for ptr, b in mine.items() if ptr not in orig)
    factors = sum(p.numel() * p.element_size() for m in low_rank(new).values() for p in m.parameters())
    assert 0 < fresh <= factors
    if arch == "gpt2":  # tied LM head: still one tensor, the original's
        assert new.lm_head.weight is new.transformer.wte.weight
        assert new.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # the same outputs as the old full deep copy
    ref = copy.deepcopy(model)
    for name in replaced:
        up, down = decs[name].decomposition.factors(ranks[name])
        replace_layer(ref, name, LowRankLinear.replacing(ref.get_submodule(name), up, down))
    ref.eval()
    model.eval()
    assert torch.equal(outputs(new, arch), outputs(ref, arch))
    # the original: same state, outputs, types, flags, modes
    assert torch.equal(outputs(model, arch), out_before)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not low_rank(model)
    model.train()
    new.requires_grad_(False)  # the copy's flags and dtype are its own
    new.double()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(m.training for m in model.modules()) and not any(m.training for m in new.modules())
