"""TransformerLens compatibility: our hook sites, ActivationCache helpers and logit lens against
TransformerLens 4.3's TransformerBridge (which wraps HF's own modules) on the same tiny random Gemma 2;
exact Gemma 2 attribution where TransformerLens is inexact; incl_grad and stop_at_layer.

The bridge runs with enable_compatibility_mode(no_processing=True): TransformerLens's hook names and
helpers over HF's unmodified weights (no folding or centring), i.e. the same function we compute."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gemma_jax
from gemma_jax import hooks, interp
from gemma_jax.errors import GenerationError
from hf_oracle import hf_model, save

T = 16   # 4x the sliding window of the tiny model
TOL = 1e-4

# TransformerBridge names with no site of ours: the token ids and the rotary tables.
TL_ONLY = {"embed.hook_in", "rotary_emb.hook_in", "rotary_emb.hook_cos", "rotary_emb.hook_sin"}
TL_ONLY_PER_LAYER = {"attn.hook_cos", "attn.hook_sin"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(our Gemma, the TransformerBridge) on one tiny random HF Gemma 2 (every weight random, norms too)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformer_lens.model_bridge import TransformerBridge
    root = tmp_path_factory.mktemp("tl")
    save(hf_model(seed=11, embed_std=0.1), root / "hf")
    gemma_jax.convert(root / "hf", root / "ckpt")
    bridge = TransformerBridge.boot_transformers(str(root / "hf"), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    bridge.set_use_attn_result(True)   # per-head results in TransformerLens's cache
    return gemma_jax.load(root / "ckpt"), bridge


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 128, (2, T))


@pytest.fixture(scope="module")
def runs(models, ids):
    """(our logits, our ActivationCache of every site, TL logits, TL ActivationCache)."""
    ours, bridge = models
    logits, cache = ours.run_with_cache(ids)
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(torch.as_tensor(ids))
    return np.asarray(logits), cache, tl_logits.numpy(), tl_cache


def _np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def test_every_shared_hook_name_matches_transformer_lens(models, runs, report):
    """Every name in TransformerLens's cache is one of our sites (or an alias of one) with the same
    shape and value, except the token ids and rotary tables; attention scores agree on visible keys
    (masked ones: -inf there, -2.38e38 here)."""
    ours, _ = models
    _, cache, tl_logits, tl = runs
    n = ours.config.num_hidden_layers
    ours_names = set(hooks.site_names(ours.config))
    unmatched, worst, compared = set(), {}, set()
    for name, value in tl.items():
        site = hooks.canonical(ours.config, name)
        if site not in ours_names:
            unmatched.add(name)
            continue
        mine, ref = _np(cache[name]), _np(value)
        assert mine.shape == ref.shape, name
        if site.endswith("hook_attn_scores"):
            visible = mine > -1e30
            assert (ref[~visible] == -np.inf).all() and np.isfinite(ref[visible]).all(), name
            mine, ref = mine[visible], ref[visible]
        kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
        worst[kind] = max(worst.get(kind, 0.0), float(np.abs(mine - ref).max()))
        compared.add(site)
    assert unmatched == TL_ONLY | {f"blocks.{i}.{s}" for i in range(n) for s in TL_ONLY_PER_LAYER}
    # our only site TransformerLens lacks: the soft-capped logits (its run returns them instead)
    assert ours_names - compared == {"hook_logits"}
    worst["hook_logits vs TL's returned logits"] = float(np.abs(runs[0] - tl_logits).max())
    for kind, value in sorted(worst.items()):
        report(f"vs TransformerLens 4.3 max|diff| {kind}", value)
    assert max(worst.values()) <= TOL


@pytest.mark.parametrize("helper,kwargs", [
    ("accumulated_resid", kw) for kw in (dict(), dict(apply_ln=True), dict(incl_mid=True, apply_ln=True),
                                         dict(layer=2, apply_ln=True), dict(layer=1, mlp_input=True, apply_ln=True),
                                         dict(pos_slice=-1, apply_ln=True), dict(layer=2, pos_slice=(3, 11)))] + [
    ("decompose_resid", kw) for kw in (dict(), dict(apply_ln=True), dict(mode="attn"), dict(mode="mlp", layer=2),
                                       dict(layer=2, mlp_input=True, apply_ln=True),
                                       dict(pos_slice=(2, 9), apply_ln=True),
                                       dict(incl_embeds=False, pos_slice=[0, 5, 15]))])
def test_resid_helpers_match_transformer_lens(runs, helper, kwargs):
    """accumulated_resid and decompose_resid: the same labels and values as TransformerLens's."""
    _, cache, _, tl = runs
    mine, labels = getattr(cache, helper)(**kwargs, return_labels=True)
    ref, tl_labels = getattr(tl, helper)(**kwargs, return_labels=True)
    assert labels == tl_labels
    np.testing.assert_allclose(_np(mine), _np(ref), atol=TOL, rtol=0)


def test_logit_lens_matches_transformer_lens(models, runs, report):
    from transformer_lens.tools.analysis.logit_lens import logit_lens
    _, bridge = models
    logits, cache, _, tl = runs
    for positions in (None, -1, (4, 12)):
        mine, labels = cache.logit_lens(positions=positions, return_labels=True)
        ref = logit_lens(bridge, cache=tl, positions=positions)
        assert labels == ref.labels
        np.testing.assert_allclose(_np(mine), _np(ref.values), atol=TOL, rtol=0)
    full = _np(cache.logit_lens(positions=None))
    report("logit lens final entry vs our logits max|diff|", float(np.abs(full[-1] - logits).max()))
    np.testing.assert_allclose(full[-1], logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_np(cache.logit_lens(layers=[0, -1])), _np(cache.logit_lens())[[0, -1]], atol=0)


def test_apply_ln_to_stack_and_remove_batch_dim_match_transformer_lens(models, ids, runs):
    ours, bridge = models
    _, cache, _, tl = runs
    stack = cache.decompose_resid(layer=1)
    for kw in (dict(layer=1), dict(layer=1, mlp_input=False, pos_slice=None), dict(layer=None)):
        ref = tl.apply_ln_to_stack(torch.as_tensor(np.array(cache.decompose_resid(layer=kw["layer"]))), **kw)
        np.testing.assert_allclose(_np(cache.apply_ln_to_stack(cache.decompose_resid(layer=kw["layer"]), **kw)),
                                   _np(ref), atol=TOL, rtol=0)
    assert stack.shape[1:] == (2, T, ours.config.hidden_size)
    _, one = ours.run_with_cache(ids[:1], names=["blocks.*.hook_resid_pre", "blocks.2.hook_resid_post",
                                                 "ln_final.hook_scale"], remove_batch_dim=True)
    with torch.no_grad():
        _, tl_one = bridge.run_with_cache(torch.as_tensor(ids[:1]), remove_batch_dim=True)
    assert not one.has_batch_dim and one["blocks.0.hook_resid_pre"].shape == (T, ours.config.hidden_size)
    for kw in (dict(), dict(apply_ln=True), dict(pos_slice=3, apply_ln=True)):
        np.testing.assert_allclose(_np(one.accumulated_resid(**kw)), _np(tl_one.accumulated_resid(**kw)),
                                   atol=TOL, rtol=0)
    with pytest.raises(GenerationError, match="batch size 2"):
        cache.remove_batch_dim()


def test_numpy_cache_and_shorthand_keys(models, runs):
    _, cache, _, _ = runs
    host = cache.to_numpy()
    assert all(isinstance(v, np.ndarray) for v in host.values()) and set(host) == set(cache)
    np.testing.assert_array_equal(host["resid_pre", 1], np.asarray(cache["blocks.1.hook_resid_pre"]))
    np.testing.assert_array_equal(host["pattern", -1], host["blocks.2.attn.hook_pattern"])
    np.testing.assert_array_equal(host["scale2ln1"], host["blocks.2.ln1.hook_scale"])
    np.testing.assert_array_equal(host["blocks.0.ln1_post.hook_out"], host["blocks.0.hook_attn_out"])
    np.testing.assert_array_equal(host["normalized"], host["ln_final.hook_normalized"])
    with pytest.raises(KeyError, match="not in this cache"):
        host["blocks.9.hook_resid_pre"]
    np.testing.assert_allclose(host.decompose_resid(), _np(cache.decompose_resid()), atol=0)


# --------------------------------------------------------------------------- exact attribution
def test_head_results_sum_to_attn_out_exactly_where_transformer_lens_misses(runs, report):
    """TransformerLens's per-head results (attn.hook_result) sum to the output projection *before* the
    post-attention norm, so they miss hook_attn_out; ours pass through that norm with its scale frozen
    and sum to it. With incl_remainder both stacks rebuild resid_post."""
    _, cache, _, tl = runs
    n = 3
    miss_tl, miss_ours, scale = 0.0, 0.0, 0.0
    for layer in range(n):
        attn_out = _np(cache[f"blocks.{layer}.hook_attn_out"])
        heads = _np(cache.stack_head_results(layer + 1))[-4:]               # this layer's 4 heads
        tl_heads = _np(tl.stack_head_results(layer + 1))[-4:]
        miss_ours = max(miss_ours, float(np.abs(heads.sum(0) - attn_out).max()))
        miss_tl = max(miss_tl, float(np.abs(tl_heads.sum(0) - attn_out).max()))
        scale = max(scale, float(np.abs(attn_out).max()))
        # TransformerLens's result is exactly our pre-norm per-head output
        np.testing.assert_allclose(tl_heads.sum(0), _np(cache[f"blocks.{layer}.attn.hook_out"]), atol=TOL, rtol=0)
    report("per-head results: ours sum vs hook_attn_out max|diff|", miss_ours)
    report("per-head results: TransformerLens sum vs hook_attn_out max|diff|", miss_tl)
    report("per-head results: max|hook_attn_out|", scale)
    assert miss_ours <= 1e-5 and miss_tl > 1.0
    stack, labels = cache.stack_head_results(return_labels=True, incl_remainder=True)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and labels[-1] == "remainder"
    np.testing.assert_allclose(_np(stack.sum(0)), _np(cache["blocks.2.hook_resid_post"]), atol=1e-5, rtol=0)


def test_head_results_from_z_without_hook_result(models, ids, runs):
    """Caching only hook_z and the post-attention norm's input gives the same per-head results."""
    ours, _ = models
    _, cache, _, _ = runs
    _, small = ours.run_with_cache(ids, names=["blocks.*.attn.hook_z", "blocks.*.attn.hook_out", "hook_embed"])
    np.testing.assert_allclose(_np(small.stack_head_results()), _np(cache.stack_head_results()), atol=1e-5, rtol=0)
    with pytest.raises(GenerationError, match="needs blocks.0.attn.hook_z"):
        ours.run_with_cache(ids, names=["hook_embed"])[1].stack_head_results()


def test_logit_attrs_sum_to_the_pre_softcap_logits(models, ids, runs, report):
    """Components (residual parts or heads + remainder) sum to the pre-soft-cap logit of every
    position's token, and of a logit difference; TransformerLens's logit_attrs (no (1 + w), and the
    soft-cap after) does not. softcap='linearize' gives the capped logit to first order."""
    ours, _ = models
    logits, cache, _, tl = runs
    cfg = ours.config
    pre_cap = _np(cache["unembed.hook_out"])
    targets, wrong = ids, (ids + 7) % cfg.vocab_size
    pick = lambda a, t: np.take_along_axis(a, t[..., None], -1)[..., 0]  # noqa: E731
    want = pick(pre_cap, targets)
    worst = 0.0
    for stack in (cache.decompose_resid(), cache.stack_head_results(incl_remainder=True),
                  cache.decompose_resid(mode="attn")[:1]):
        if stack.shape[0] == 1:   # hook_embed alone: not a complete decomposition
            continue
        worst = max(worst, float(np.abs(_np(cache.logit_attrs(stack, targets)).sum(0) - want).max()))
    diff = _np(cache.logit_attrs(cache.decompose_resid(), targets, incorrect_tokens=wrong)).sum(0)
    worst = max(worst, float(np.abs(diff - (want - pick(pre_cap, wrong))).max()))
    tl_miss = float(np.abs(_np(tl.logit_attrs(tl.decompose_resid(), torch.as_tensor(targets))).sum(0) - want).max())
    report("logit_attrs: ours sum vs pre-soft-cap logit max|diff|", worst)
    report("logit_attrs: TransformerLens sum vs pre-soft-cap logit max|diff|", tl_miss)
    assert worst <= 1e-4 and tl_miss > 0.1
    # one token for every position, [batch] tokens, and a position slice
    np.testing.assert_allclose(_np(cache.logit_attrs(cache.decompose_resid(), 5)).sum(0), pre_cap[..., 5], atol=1e-4)
    last = _np(cache.logit_attrs(cache.decompose_resid(pos_slice=-1), ids[:, -1], pos_slice=-1)).sum(0)
    np.testing.assert_allclose(last, pick(pre_cap[:, -1], ids[:, -1]), atol=1e-4)
    # linearized soft-cap: the slope at the observed logit times the pre-cap logit
    cap = cfg.final_logit_softcapping
    lin = _np(cache.logit_attrs(cache.decompose_resid(), targets, softcap="linearize")).sum(0)
    np.testing.assert_allclose(lin, want * (1 - np.tanh(want / cap) ** 2), atol=1e-4)
    assert np.abs(lin - pick(logits, targets)).max() <= (np.abs(want) ** 3).max() / cap ** 2 + 1e-4
    with pytest.raises(GenerationError, match="softcap must be"):
        cache.logit_attrs(cache.decompose_resid(), 5, softcap="tangent")
    with pytest.raises(GenerationError, match="same shape"):
        cache.logit_attrs(cache.decompose_resid(), targets, incorrect_tokens=5)


# ------------------------------------------------------------------------ incl_grad, stop_at_layer
def test_incl_grad_equals_jax_grad_through_an_explicit_hook(models, ids, report):
    ours, _ = models
    target = 17

    def metric(logits):
        return logits[:, -1, target].sum() - 0.5 * logits[0, 3].mean()
    names = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_pattern", "blocks.2.ln2.hook_normalized",
             "blocks.1.attn.hook_result", "ln_final.hook_scale"]
    logits, cache = ours.run_with_cache(ids, names=names, incl_grad=metric)
    assert set(cache) == set(names) | {f"{n}_grad" for n in names}
    tok = jnp.asarray(ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), ids.shape)
    worst = 0.0
    for name in names:
        def loss(delta, name=name):
            def hook(site, value):
                return value + delta if site == name else value
            hook.sites = frozenset({name})
            return metric(interp.forward(ours.graphdef, ours.state, tok, pos, hook))
        ref = jax.grad(loss)(jnp.zeros_like(cache[name]))
        got = cache[f"{name}_grad"]
        assert got.shape == cache[name].shape and float(jnp.abs(ref).max()) > 0
        worst = max(worst, float(jnp.abs(got - ref).max() / jnp.abs(ref).max()))
    report("incl_grad vs jax.grad through a hook, max relative diff", worst)
    assert worst <= 1e-5
    np.testing.assert_allclose(np.asarray(logits), ours.logits(ids), atol=1e-5, rtol=0)
    with pytest.raises(GenerationError, match="stop_at_layer"):
        ours.run_with_cache(ids, names=names, incl_grad=metric, stop_at_layer=1)


def test_stop_at_layer_stops_the_forward(models, ids, runs, report):
    """The output is the residual entering that layer, equal to the full run's; the compiled
    program does less work (XLA's FLOP count) and keeps only earlier sites."""
    ours, bridge = models
    _, cache, _, _ = runs
    for layer in (0, 1, 2, 3, -1):
        out, part = ours.run_with_cache(ids, names="blocks.*.hook_resid_pre", stop_at_layer=layer)
        i = layer if layer >= 0 else 3 + layer
        want = cache["blocks.2.hook_resid_post"] if i == 3 else cache[f"blocks.{i}.hook_resid_pre"]
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5, rtol=0)
        assert set(part) == {f"blocks.{j}.hook_resid_pre" for j in range(i)}   # later sites never ran
    with torch.no_grad():
        tl_out = bridge.run_with_hooks(torch.as_tensor(ids), stop_at_layer=2)
    np.testing.assert_allclose(np.asarray(ours.run_with_hooks(ids, stop_at_layer=2)), tl_out.numpy(), atol=TOL)

    tok = jnp.asarray(ids, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), ids.shape)
    flops = {}
    for stop in (1, None):
        compiled = interp._run.lower(ours.graphdef, ours.state, tok, pos, (), hooks.Hooks(()), stop, None).compile()
        flops[stop] = compiled.cost_analysis()["flops"]
    report("stop_at_layer=1 / full forward, compiled FLOPs", flops[1] / flops[None])
    assert flops[1] < 0.5 * flops[None]
    for bad in (4, -4, 1.5):
        with pytest.raises(GenerationError, match="stop_at_layer must be"):
            ours.run_with_hooks(ids, stop_at_layer=bad)
