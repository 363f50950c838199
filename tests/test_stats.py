"""collect_statistics: exact per-sample gradients (vs torch.func), moments, hygiene, errors."""

import pytest
import torch
from torch.func import functional_call, grad

import tiny_models
from gfwsvd_core import collect_statistics, estimate_memory
from gfwsvd_core.layers import get_weight, select_layers
from gfwsvd_core.stats import Cancelled


def make_batch(B=3, T=6, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        for b in range(B):
            mask[b, T - b:] = 0  # right padding of b tokens
    return {"input_ids": ids, "attention_mask": mask}


def encoder_loss(model, batch):
    """A nonlinear per-sequence loss on the hidden states (pads masked out)."""
    out = model(**batch).last_hidden_state  # (B, T, h)
    v = torch.linspace(-1, 1, out.shape[-1])
    per_tok = torch.tanh(out @ v) ** 2 * batch["attention_mask"]
    return per_tok.sum(1)


def lm_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tgt = batch["input_ids"][:, 1:]
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt[..., None])[..., 0]
    return -(lp * batch["attention_mask"][:, 1:]).sum(1)


CASES = {
    "bert": (tiny_models.tiny_bert, encoder_loss),
    "gpt2": (tiny_models.tiny_gpt2, lm_loss),
    "llama": (tiny_models.tiny_llama, lm_loss),
}


def func_per_sample_grads(model, loss_fn, batch, names):
    """Reference: torch.func gradient of each sample's loss, one sample at a time."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys = [f"{n}.weight" for n in names]
    B = batch["input_ids"].shape[0]
    out = {n: [] for n in names}
    for b in range(B):
        sample = {k: v[b:b + 1] for k, v in batch.items()}

        def f(p):
            return loss_fn(_Bound(model, {**params, **p}), sample).sum()

        gs = grad(f)({k: params[k] for k in keys})
        for n, k in zip(names, keys):
            mod = model.get_submodule(n)
            g = gs[k]
            out[n].append(g if isinstance(mod, torch.nn.Linear) else g.T)  # Conv1D stores in x out
    return {n: torch.stack(v) for n, v in out.items()}


class _Bound(torch.nn.Module):
    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def __call__(self, **kw):
        return functional_call(self.model, self.params, (), kw)


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("storage", ["factored", "materialized"])
def test_per_sample_gradients_match_torch_func(arch, storage):
    build, loss_fn = CASES[arch]
    model = build()
    batch = make_batch()
    stats = collect_statistics(model, [batch], loss_fn, storage=storage)
    names = list(stats)[:5] + list(stats)[-2:]
    ref = func_per_sample_grads(model, loss_fn, batch, names)
    for n in names:
        G = torch.cat(list(stats[n].per_sample_gradients()))
        assert stats[n].storage == storage
        assert G.shape == ref[n].shape
        scale = ref[n].abs().max()
        assert float((G - ref[n]).abs().max() / scale) < 1e-4, n
        # diagonal Fisher is the mean of per-sample squares, not the square of the mean
        assert torch.allclose(stats[n].diagonal_fisher.float(), (ref[n] ** 2).mean(0), rtol=1e-3, atol=1e-6 * float(scale) ** 2)
        assert torch.allclose(stats[n].grad_mean.float(), ref[n].mean(0), rtol=1e-3, atol=1e-5 * float(scale))


def test_sample_units_token_sequence_batch():
    model = tiny_models.tiny_gpt2()
    batch = make_batch(B=3, T=6)
    seq = collect_statistics(model, [batch], lm_loss, sample_unit="sequence")
    tok = collect_statistics(model, [batch], lm_loss, sample_unit="token")
    bat = collect_statistics(model, [batch], lm_loss, sample_unit="batch")
    n = "transformer.h.0.mlp.c_fc"
    valid = int(batch["attention_mask"].sum())
    assert (seq[n].num_samples, tok[n].num_samples, bat[n].num_samples) == (3, valid, 1)
    assert tok[n].X.shape[1] == 1
    Gs = torch.cat(list(seq[n].per_sample_gradients()))
    Gt = torch.cat(list(tok[n].per_sample_gradients()))
    Gb = torch.cat(list(bat[n].per_sample_gradients()))
    assert torch.allclose(Gt.sum(0), Gs.sum(0), atol=1e-5)
    assert torch.allclose(Gb[0], Gs.sum(0), atol=1e-5)
    # token samples: the cheap diagonal path equals the per-sample definition
    assert torch.allclose(tok[n].diagonal_fisher.float(), (Gt**2).mean(0), rtol=1e-4, atol=1e-12)


def test_moments_and_padding_are_masked():
    model = tiny_models.tiny_bert()
    batch = make_batch(B=3, T=5)
    st = collect_statistics(model, [batch], encoder_loss)
    n = "encoder.layer.0.attention.self.query"
    s = st[n]
    # reference inputs from a plain hook
    seen = []
    h = model.get_submodule(n).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**batch)
    h.remove()
    X = seen[0][batch["attention_mask"].bool()].double()
    assert s.num_tokens == X.shape[0]
    assert torch.allclose(s.input_gram, X.T @ X, rtol=1e-5, atol=1e-6)
    assert torch.allclose(s.kfac_in, X.T @ X / X.shape[0], rtol=1e-5, atol=1e-8)
    assert torch.allclose(s.act_absmean, X.abs().mean(0), rtol=1e-5)
    Gsum = s.grad_mean * s.num_samples
    D = s.D.reshape(-1, s.out_features).double()
    assert torch.allclose(s.kfac_out * s.num_samples, D.T @ D, rtol=1e-5, atol=1e-10)
    assert torch.allclose(Gsum, D.T @ s.X.reshape(-1, s.in_features).double(), rtol=1e-5, atol=1e-10)
    # padded tokens carry nothing
    assert float(s.X[2, 3:].abs().sum()) == 0.0


def test_batch_split_equals_one_shot():
    model = tiny_models.tiny_llama()
    full = make_batch(B=4, T=6, pad=False)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    a = collect_statistics(model, [full], lm_loss)
    b = collect_statistics(model, halves, lm_loss)
    for n in a:
        for attr in ("grad_sq_sum", "grad_sum", "xx_sum", "dd_sum", "abs_x_sum", "X", "D"):
            x, y = getattr(a[n], attr), getattr(b[n], attr)
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6 * float(x.abs().max())), (n, attr)
        assert a[n].num_samples == b[n].num_samples == 4


def test_hooks_flags_and_grads_untouched():
    model = tiny_models.tiny_bert()
    model.train()
    calls = []
    user = model.encoder.layer[0].attention.self.query.register_forward_hook(lambda *a: calls.append(1))
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    for p in model.encoder.parameters():
        p.requires_grad_(False)  # a frozen model still gets its Fisher
    st = collect_statistics(model, [make_batch()], encoder_loss)
    assert len(calls) == 1 and float(st["encoder.layer.0.attention.self.query"].grad_sq_sum.sum()) > 0
    assert model.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.parameters())
    for mod in model.modules():
        assert not mod._forward_hooks or mod is model.encoder.layer[0].attention.self.query
    model(**make_batch())
    assert len(calls) == 2
    user.remove()


def test_layer_selection_and_errors():
    model = tiny_models.tiny_bert()
    assert list(select_layers(model, "attention.self.query")) == [
        "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query"]
    assert len(select_layers(model, "re:layer\\.1\\..*dense")) == 3
    assert len(select_layers(model, lambda n, m: n.endswith("key"))) == 2
    with pytest.raises(ValueError, match="matches no linear layer.*encoder.layer.0.attention.self.query"):
        collect_statistics(model, [make_batch()], encoder_loss, layers=["attn.c_fc"])
    with pytest.raises(ValueError, match="no calibration batches"):
        collect_statistics(model, [], encoder_loss)
    with pytest.raises(ValueError, match="sample_unit"):
        collect_statistics(model, [make_batch()], encoder_loss, sample_unit="window")
    with pytest.raises(ValueError, match="per-sample losses"):
        collect_statistics(model, [make_batch()], lambda m, b: encoder_loss(m, b).mean())
    # token and batch samples are defined for a loss that couples the batch
    tok = collect_statistics(model, [make_batch()], lambda m, b: encoder_loss(m, b).mean(), sample_unit="token")
    assert next(iter(tok.values())).num_samples == int(make_batch()["attention_mask"].sum())
    with pytest.raises(ValueError, match="not finite"):
        collect_statistics(model, [make_batch()], lambda m, b: encoder_loss(m, b) * float("nan"))


def test_non_finite_gradient_names_the_layer():
    model = tiny_models.tiny_bert()

    def loss(m, b):  # finite loss, NaN gradient: d sqrt(u)/du at u = 0 times 0
        h = m(**b).last_hidden_state
        return torch.sqrt(0.0 * h**2).sum((1, 2))

    with pytest.raises(ValueError, match="layer encoder.layer.0.attention.self.query: non-finite"):
        collect_statistics(model, [make_batch()], loss)


def test_layer_groups_bound_memory_and_give_the_same_result():
    model = tiny_models.tiny_bert()
    batches = [make_batch(seed=s) for s in range(2)]
    sizes = estimate_memory(model, num_samples=6, tokens_per_sample=6)
    budget = max(sizes.values()) * 2
    one = collect_statistics(model, batches, encoder_loss)
    grouped = collect_statistics(model, batches, encoder_loss, max_memory=budget)
    for n in one:
        assert torch.allclose(one[n].grad_sq_sum, grouped[n].grad_sq_sum)
    with pytest.raises(ValueError, match="list of batches"):
        collect_statistics(model, iter(batches), encoder_loss, max_memory=budget)
    with pytest.raises(ValueError, match="memory budget"):
        collect_statistics(model, batches, encoder_loss, max_memory=10)
    got = sum(s.nbytes() for s in one.values())
    assert 0.5 * sum(sizes.values()) < got < 2 * sum(sizes.values())


def test_progress_and_cancel():
    model = tiny_models.tiny_bert()
    seen = []
    collect_statistics(model, [make_batch(), make_batch(seed=1)], encoder_loss,
                       progress=lambda d, t, msg: seen.append((d, t, msg)))
    # before each batch: which one runs; after it: how many are done
    assert seen == [(0, 2, "statistics: batch 1 of 2 (12 layers)"), (1, 2, "statistics: 1 of 2 batches done (12 layers)"),
                    (1, 2, "statistics: batch 2 of 2 (12 layers)"), (2, 2, "statistics: 2 of 2 batches done (12 layers)")]

    class Ev:
        def is_set(self):
            return True

    with pytest.raises(Cancelled):
        collect_statistics(model, [make_batch()], encoder_loss, cancel=Ev())


def test_weight_layout_conv1d():
    model = tiny_models.tiny_gpt2()
    mod = model.transformer.h[0].mlp.c_fc
    W = get_weight(mod)
    x = torch.randn(2, 32)
    assert torch.allclose(mod(x), x @ W.T + mod.bias, atol=1e-6)


def test_chunk_samples_sized_by_bytes(monkeypatch):
    from gfwsvd_core import stats as st

    monkeypatch.delenv("GFWSVD_CHUNK_MB", raising=False)
    # an 11008 x 4096 layer: G_k and G_k**2 are 2 * 180 MB, so one sample per 256 MiB chunk
    assert st._chunk_samples(11008, 4096, copies=2) == 1
    assert st._chunk_samples(32, 32, 1024 * 32 * 32 * 4) == 1024
    assert st._chunk_samples(32, 32, 1024 * 32 * 32 * 4, copies=2) == 512
    assert st._chunk_samples(32, 32, 1024 * 32 * 32 * 8, itemsize=8) == 1024
    assert st._chunk_samples(32, 32, 1) == 1  # never zero
    assert st._chunk_samples(32, 32) == st.CHUNK_BYTES // (32 * 32 * 4)
    monkeypatch.setenv("GFWSVD_CHUNK_MB", "1")
    assert st._chunk_samples(32, 32) == 2**20 // (32 * 32 * 4)
    monkeypatch.setenv("GFWSVD_CHUNK_MB", "lots")
    with pytest.raises(ValueError, match="GFWSVD_CHUNK_MB"):
        st._chunk_samples(32, 32)


def _max_bmm_batch(monkeypatch):
    """Patch torch.bmm to record the batch size of each call; returns the list of sizes."""
    sizes, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: (sizes.append(a.shape[0]), bmm(a, b))[1])
    return sizes


@pytest.mark.parametrize("storage", ["factored", "materialized"])
def test_tiny_chunk_budget_gives_the_same_statistics(monkeypatch, storage):
    from gfwsvd_core import stats as st

    monkeypatch.delenv("GFWSVD_CHUNK_MB", raising=False)
    model = tiny_models.tiny_llama()
    batches = [make_batch(B=4, T=6, seed=s) for s in range(2)]
    sizes = _max_bmm_batch(monkeypatch)
    ref = collect_statistics(model, batches, lm_loss, storage=storage)
    assert max(sizes) == 4  # default budget: a whole batch per chunk on a tiny model
    sizes.clear()
    monkeypatch.setattr(st, "CHUNK_BYTES", 1)  # one sample per chunk
    tiny = collect_statistics(model, batches, lm_loss, storage=storage)
    assert max(sizes) == 1
    for n in ref:
        a, b = ref[n], tiny[n]
        assert a.num_samples == b.num_samples == 8
        assert torch.allclose(a.grad_sq_sum, b.grad_sq_sum, rtol=1e-6, atol=0), n
        assert torch.allclose(a.grad_sum, b.grad_sum, rtol=1e-6, atol=1e-7 * float(a.grad_sum.abs().max()))
        if storage == "materialized":
            assert torch.allclose(a.G, b.G, rtol=1e-6, atol=1e-7 * float(a.G.abs().max())), n
        # chunked readers: the same gradients and quadratic whatever the budget
        sizes.clear()
        Gs = torch.cat(list(b.per_sample_gradients()))
        assert storage == "materialized" or max(sizes) == 1
        assert torch.allclose(torch.cat(list(a.per_sample_gradients(budget_bytes=2**30))), Gs, rtol=1e-6, atol=1e-7 * float(Gs.abs().max()))
        dW = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
        assert a.quadratic(dW, budget_bytes=2**30) == pytest.approx(b.quadratic(dW), rel=1e-5)
    # explicit per-call budget
    sizes.clear()
    monkeypatch.setattr(st, "CHUNK_BYTES", 2**30)
    collect_statistics(model, batches[:1], lm_loss, storage=storage, chunk_bytes=1, layers="mlp.up_proj")
    assert sizes and max(sizes) == 1


MERGE_FIELDS = ("grad_sq_sum", "grad_sum", "xx_sum", "dd_sum", "abs_x_sum")


@pytest.mark.parametrize("unit,storage", [("sequence", "factored"), ("sequence", "materialized"),
                                          ("token", "auto"), ("batch", "auto")])
def test_merge_of_two_passes_equals_one_pass(unit, storage):
    from gfwsvd_core.stats import merge_stats

    model = tiny_models.tiny_gpt2()
    batches = [make_batch(B=3, T=T, seed=s) for s, T in enumerate((6, 4, 7))]  # lengths differ: padding
    kw = dict(sample_unit=unit, storage=storage)
    full = collect_statistics(model, batches, lm_loss, **kw)
    first = collect_statistics(model, batches[:1], lm_loss, **kw)
    rest = collect_statistics(model, batches[1:], lm_loss, **kw)
    for n in full:
        merged = merge_stats(first[n], rest[n])
        a = full[n]
        assert (merged.num_samples, merged.num_tokens) == (a.num_samples, a.num_tokens)
        assert merged.storage == a.storage and merged.info["storage"] == a.storage
        for f in MERGE_FIELDS:
            assert torch.allclose(getattr(merged, f), getattr(a, f), rtol=1e-12, atol=0), (n, f)
        for f in ("X", "D", "G"):
            x, y = getattr(merged, f), getattr(a, f)
            assert (x is None and y is None) or torch.equal(x, y), (n, f)
        assert merged.nbytes() == a.nbytes()
        assert torch.allclose(merged.diagonal_fisher, a.diagonal_fisher, rtol=1e-12)


def test_merge_mixed_storage_and_mismatches():
    from gfwsvd_core.stats import merge_stats

    model = tiny_models.tiny_llama()
    b1, b2 = make_batch(B=2, T=5, seed=1), make_batch(B=3, T=6, seed=2)
    fac = collect_statistics(model, [b1], lm_loss, storage="factored")
    mat = collect_statistics(model, [b2], lm_loss, storage="materialized")
    n = "model.layers.0.mlp.up_proj"
    m = merge_stats(fac[n], mat[n])
    assert m.storage == "materialized" and m.num_samples == 5
    want = torch.cat([*fac[n].per_sample_gradients(), mat[n].G])
    assert torch.allclose(m.G, want)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_stats(fac[n], mat["model.layers.0.mlp.down_proj"])
    inputs_only = collect_statistics(model, [b2], lm_loss, kinds=["inputs"])
    with pytest.raises(ValueError, match="differ in the kinds"):
        merge_stats(fac[n], inputs_only[n])


def test_kfac_reads_the_input_moments_collected_once():
    from gfwsvd_core.stats import estimate_layer_bytes

    model = tiny_models.tiny_bert()
    kf = collect_statistics(model, [make_batch()], encoder_loss, kinds=["kfac"])
    both = collect_statistics(model, [make_batch()], encoder_loss, kinds=["kfac", "inputs"])
    n = "encoder.layer.0.attention.self.query"
    assert kf[n].has("inputs") and kf[n].has("kfac") and not kf[n].has("diagonal")
    assert torch.equal(kf[n].xx_sum, both[n].xx_sum) and kf[n].nbytes() == both[n].nbytes()
    assert estimate_layer_bytes(8, 4, 3, 2, ["kfac"]) == estimate_layer_bytes(8, 4, 3, 2, ["kfac", "inputs"]) \
        == 8 * 8 * 8 + 4 * 4 * 8 + 4 * 8


def test_a_new_kind_is_one_class_and_one_registration(monkeypatch):
    """A statistic outside LayerStats' fields: sum_t |d| per output channel, kept in ``extra``."""
    from gfwsvd_core import statistics
    from gfwsvd_core.stats import estimate_layer_bytes, merge_stats

    class AbsD(statistics.StatKind):
        name = "absd"
        needs_grad = True
        fields = ("abs_d_sum",)

        def sums(self, m, n):
            return {"abs_d_sum": (m,)}

        def add_gradients(self, s, state, X, D):
            s.extra["abs_d_sum"] += D.abs().sum((0, 1)).double()

    monkeypatch.setitem(statistics.KINDS, "absd", AbsD())  # what statistics.register does, undone after
    model = tiny_models.tiny_bert()
    batches = [make_batch(seed=0), make_batch(seed=1)]
    st = collect_statistics(model, batches, encoder_loss, kinds=["samples", "absd"], storage="factored")
    n = "encoder.layer.1.output.dense"
    s = st[n]
    assert s.has("absd") and not s.has("diagonal")
    assert torch.allclose(s.extra["abs_d_sum"], s.D.abs().sum((0, 1)).double(), rtol=1e-6)
    assert estimate_layer_bytes(8, 4, 3, 2, ["absd"]) == 8 * 8
    halves = [collect_statistics(model, [b], encoder_loss, kinds=["absd"], layers=n)[n] for b in batches]
    assert torch.allclose(merge_stats(*halves).extra["abs_d_sum"], s.extra["abs_d_sum"], rtol=1e-12)
    assert collect_statistics(model, batches[:1], encoder_loss, kinds=["absd"], layers=n)[n].nbytes() == s.out_features * 8
