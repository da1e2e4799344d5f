"""fastattn.nn against torch.nn with one state_dict: outputs and gradients, fused and dense paths.

Tolerance (the rule of fastattn.testing): torch's module in float64 with the same weights is the
oracle; fastattn's float32 error against it must be at most 2x (outputs) / 3x (gradients) the
error of torch's own float32 module, plus the rounding floor.
"""

import copy
import warnings

import pytest
import torch

import fastattn
from fastattn import FastAttnFallbackWarning, functional
from fastattn.nn import _dense
from fastattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_oracle

E, H = 32, 4


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused kernels' entry point, and re-arms the one-time warnings."""
    calls = []
    real = functional.attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(functional, "attention", counting)
    monkeypatch.setattr(_dense, "_warned_reasons", set())
    return calls


def _cotangent(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_and_grad(module, make_args, dtype, is_float_output=lambda i: True):
    """Runs `module(*args, **kwargs)` in `dtype`; returns its tensor outputs and the gradients of a
    fixed random projection of them w.r.t. the float inputs and every parameter."""
    module = copy.deepcopy(module).to(dtype)
    args, kwargs, leaves = make_args(dtype)
    out = module(*args, **kwargs)
    outs = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    loss = sum((t * _cotangent(t.shape, i).to(dtype)).sum() for i, t in enumerate(outs))
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(loss, leaves + params)
    names = [f"input {i}" for i in range(len(leaves))] + [f"grad {n}" for n, _ in module.named_parameters()]
    return [t.detach() for t in outs], dict(zip(names, grads))


def assert_equivalent(torch_module, fast_module, make_args):
    """fastattn's module vs torch's: outputs and all gradients, by the tolerance rule."""
    oracle_outs, oracle_grads = run_and_grad(torch_module, make_args, torch.float64)
    base_outs, base_grads = run_and_grad(torch_module, make_args, torch.float32)
    outs, grads = run_and_grad(fast_module, make_args, torch.float32)
    assert len(outs) == len(oracle_outs)
    for i, (actual, oracle, base) in enumerate(zip(outs, oracle_outs, base_outs)):
        assert actual.shape == oracle.shape
        assert_close_to_oracle(actual, oracle, base, factor=OUTPUT_FACTOR, name=f"output {i}")
    assert grads.keys() == oracle_grads.keys()
    for name in grads:
        assert_close_to_oracle(grads[name], oracle_grads[name], base_grads[name], factor=GRAD_FACTOR, name=name)


def paired_mha(**options):
    """torch's MHA and fastattn's with one state_dict, loaded torch -> fastattn; the reverse
    direction is checked too (fastattn's weights load into a fresh torch module)."""
    torch.manual_seed(1)
    reference = torch.nn.MultiheadAttention(E, H, **options)
    fast = fastattn.nn.MultiheadAttention(E, H, **options)
    fast.load_state_dict(reference.state_dict())
    back = torch.nn.MultiheadAttention(E, H, **options)
    back.load_state_dict(fast.state_dict())
    assert fast.state_dict().keys() == reference.state_dict().keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    with torch.no_grad():  # non-zero biases, so that their gradients and effects are tested
        for name, p in reference.named_parameters():
            if "bias" in name:
                p.normal_()
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).triu(1)


LQ, LK = 7, 9
MHA_CASES = {
    # case: (module options, call kind, masks, fused when need_weights=False)
    "plain self-attention": ({}, "self", {}, True),
    "cross-attention": ({}, "cross", {}, True),
    "shared key/value": ({}, "shared_kv", {}, True),
    "key_padding_mask bool": ({}, "cross", {"kpm": "bool"}, True),
    "key_padding_mask float 0/-inf": ({}, "cross", {"kpm": "float"}, True),
    "key_padding_mask float other": ({}, "cross", {"kpm": "float_soft"}, False),
    "causal attn_mask bool": ({}, "self", {"attn": "causal_bool"}, True),
    "causal attn_mask float": ({}, "self", {"attn": "causal_float"}, True),
    "causal attn_mask + is_causal": ({}, "self", {"attn": "causal_bool", "is_causal": True}, True),
    "causal + key_padding_mask": ({}, "self", {"attn": "causal_float", "kpm": "float"}, True),
    "window-shaped bool attn_mask": ({}, "self", {"attn": "window"}, True),
    "arbitrary float attn_mask": ({}, "cross", {"attn": "random_float"}, False),
    "arbitrary bool attn_mask": ({}, "self", {"attn": "random_bool"}, False),
    "per-head 3-D attn_mask": ({}, "self", {"attn": "per_head"}, False),
    "kdim/vdim": ({"kdim": 24, "vdim": 16}, "cross", {"kpm": "bool"}, True),
    "add_bias_kv": ({"add_bias_kv": True}, "cross", {"kpm": "bool"}, True),
    "add_zero_attn": ({"add_zero_attn": True}, "cross", {"kpm": "bool"}, True),
    "add_bias_kv + causal": ({"add_bias_kv": True, "add_zero_attn": True}, "self", {"attn": "causal_bool"}, False),
    "no bias": ({"bias": False}, "self", {"attn": "causal_bool"}, True),
}


def make_mask(kind, batch, lq, lk, dtype, generator):
    if kind == "causal_bool":
        return causal_bool(lq)
    if kind == "causal_float":
        return torch.zeros(lq, lq, dtype=dtype).masked_fill(causal_bool(lq), float("-inf"))
    if kind == "window":  # each query sees itself and 2 keys back: window (2, 0)
        idx = torch.arange(lq)
        return (idx[None, :] > idx[:, None]) | (idx[None, :] < idx[:, None] - 2)
    if kind == "random_float":
        return torch.randn(lq, lk, generator=generator).to(dtype)
    if kind == "random_bool":  # keeps the diagonal so no row is fully masked (torch gives NaN there)
        return (torch.rand(lq, lk, generator=generator) < 0.4) & ~torch.eye(lq, lk, dtype=torch.bool)
    if kind == "per_head":
        mask = torch.zeros(batch * H, lq, lk, dtype=dtype)
        mask[::2] = torch.zeros(lq, lk, dtype=dtype).masked_fill(causal_bool(lq), float("-inf"))
        return mask
    raise ValueError(kind)


def make_padding(kind, batch, lk, dtype):
    padding = torch.zeros(batch, lk, dtype=torch.bool)
    padding[1, -3:] = True
    padding[0, 2] = True
    if kind == "bool":
        return padding
    if kind == "float":
        return torch.zeros(batch, lk, dtype=dtype).masked_fill(padding, float("-inf"))
    if kind == "float_soft":
        return torch.linspace(-2, 0, batch * lk).reshape(batch, lk).to(dtype)
    raise ValueError(kind)


def mha_args(options, call, mask_kinds, batch_first, need_weights, batched=True):
    kdim, vdim = options.get("kdim", E), options.get("vdim", E)
    batch = 2

    def make(dtype):
        generator = torch.Generator().manual_seed(5)
        lk = LQ if call == "self" else LK

        def tensor(length, dim):
            shape = ((batch, length, dim) if batch_first else (length, batch, dim)) if batched else (length, dim)
            return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

        query = tensor(LQ, E)
        if call == "self":
            key = value = query
            leaves = [query]
        elif call == "shared_kv":
            key = value = tensor(LK, kdim)
            leaves = [query, key]
        else:
            key, value = tensor(LK, kdim), tensor(LK, vdim)
            leaves = [query, key, value]
        kwargs = {"need_weights": need_weights}
        if "attn" in mask_kinds:
            kwargs["attn_mask"] = make_mask(mask_kinds["attn"], batch, LQ, lk, dtype, generator)
        if "kpm" in mask_kinds:
            padding = make_padding(mask_kinds["kpm"], batch, lk, dtype)
            kwargs["key_padding_mask"] = padding if batched else padding[0]
        if mask_kinds.get("is_causal"):
            kwargs["is_causal"] = True
        return (query, key, value), kwargs, leaves

    return make


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "need_weights"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_torch(case, batch_first, need_weights, fused_calls):
    options, call, mask_kinds, fusable = MHA_CASES[case]
    reference, fast = paired_mha(batch_first=batch_first, **options)
    make = mha_args(options, call, mask_kinds, batch_first, need_weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_equivalent(reference, fast, make)
    fallback = [w for w in caught if issubclass(w.category, FastAttnFallbackWarning)]
    if fusable and not need_weights:
        assert fused_calls and not fallback, [str(w.message) for w in fallback]
    else:
        assert not fused_calls
        assert len(fallback) == 1, "the dense path must warn exactly once"
        if need_weights:
            assert "need_weights=True" in str(fallback[0].message)


@pytest.mark.parametrize("need_weights", [False, True])
def test_unbatched_inputs(need_weights, fused_calls):
    reference, fast = paired_mha(batch_first=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_equivalent(reference, fast, mha_args({}, "cross", {"kpm": "bool"}, True, need_weights, batched=False))
    assert bool(fused_calls) != need_weights
    assert len([w for w in caught if issubclass(w.category, FastAttnFallbackWarning)]) == int(need_weights)


def test_average_attn_weights_false_returns_per_head_weights():
    reference, fast = paired_mha(batch_first=True)
    x = torch.randn(2, 5, E)
    w_ref = reference(x, x, x, average_attn_weights=False)[1]
    with pytest.warns(FastAttnFallbackWarning):
        w_fast = fast(x, x, x, average_attn_weights=False)[1]
    assert w_fast.shape == w_ref.shape == (2, H, 5, 5)
    torch.testing.assert_close(w_fast, w_ref)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_dropout_in_training_matches_torch_rng(need_weights):
    """Dropout is applied by the dense path on the same (B, H, L, S) probabilities as torch, so the
    same seed gives the same dropout pattern: the outputs are equal up to float32 rounding."""
    reference, fast = paired_mha(batch_first=True, dropout=0.4)
    reference.train(), fast.train()
    x = torch.randn(2, 6, E)
    torch.manual_seed(3)
    out_ref, w_ref = reference(x, x, x, need_weights=need_weights, average_attn_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastAttnFallbackWarning)
        torch.manual_seed(3)
        out_fast, w_fast = fast(x, x, x, need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(out_fast, out_ref)
    if need_weights:
        dropped = w_fast == 0
        assert 0.2 < dropped.float().mean() < 0.6  # p = 0.4 of the weights are zeroed...
        torch.testing.assert_close(w_fast, w_ref)  # ...the same ones as torch's
    torch.manual_seed(4)
    assert not torch.equal(fast(x, x, x, need_weights=need_weights)[0], out_fast)  # dropout is random
    fast.eval()
    out_eval = fast(x, x, x, need_weights=False)[0]
    reference.eval()
    torch.testing.assert_close(out_eval, reference(x, x, x, need_weights=False)[0])


def test_window_and_causal_options_match_dense_masks(fused_calls):
    """window/causal constructor options equal torch's module given the same dense mask."""
    for window, causal in [((2, 1), False), (3, True), (None, True), ((0, 0), False)]:
        torch.manual_seed(0)
        reference = torch.nn.MultiheadAttention(E, H, batch_first=True)
        fast = fastattn.nn.MultiheadAttention(E, H, batch_first=True, window=window, causal=causal)
        fast.load_state_dict(reference.state_dict())
        allowed = fastattn.masks.materialize(LQ, LQ, window, causal)

        def make(dtype, allowed=allowed):
            x = torch.randn(2, LQ, E, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            x = x.to(dtype).requires_grad_()
            return (x, x, x), {"need_weights": False}, [x]

        def make_with_mask(dtype, allowed=allowed):
            args, kwargs, leaves = make(dtype)
            return args, dict(kwargs, attn_mask=~allowed), leaves

        oracle_outs, oracle_grads = run_and_grad(reference, make_with_mask, torch.float64)
        base_outs, base_grads = run_and_grad(reference, make_with_mask, torch.float32)
        outs, grads = run_and_grad(fast, make, torch.float32)
        assert_close_to_oracle(outs[0], oracle_outs[0], base_outs[0], factor=OUTPUT_FACTOR)
        for name in grads:
            assert_close_to_oracle(grads[name], oracle_grads[name], base_grads[name], factor=GRAD_FACTOR, name=name)
    assert len(fused_calls) == 4


def test_fully_masked_rows_are_zero_not_nan():
    fast = fastattn.nn.MultiheadAttention(E, H, batch_first=True, bias=False)
    x = torch.randn(2, 4, E)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    padding[1] = True  # batch 1 sees nothing
    for need_weights in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FastAttnFallbackWarning)
            out, weights = fast(x, x, x, key_padding_mask=padding, need_weights=need_weights)
        assert not out.isnan().any()
        assert torch.equal(out[1], torch.zeros_like(out[1]))  # no bias: zero attention -> zero output
        if need_weights:
            assert torch.equal(weights[1], torch.zeros_like(weights[1]))


def test_is_causal_without_mask_means_causal(fused_calls):
    fast = fastattn.nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(2, 6, E)
    out = fast(x, x, x, need_weights=False, is_causal=True)[0]
    expected = fast(x, x, x, need_weights=False, attn_mask=causal_bool(6))[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert fused_calls[0]["window"] == (-1, 0)


BAD_MHA_CALLS = [
    ("4-D query", lambda m, x: m(x[None], x[None], x[None]), ValueError, "query must be 3-D"),
    ("2-D key for 3-D query", lambda m, x: m(x, x[0], x), ValueError, "key and value must have the dimensions"),
    ("wrong features", lambda m, x: m(x[..., :8], x, x), ValueError, "query must have 32 features"),
    ("batch mismatch", lambda m, x: m(x, x[:1], x[:1]), ValueError, "same batch size"),
    ("padding shape", lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)), ValueError,
     "key_padding_mask must be a tensor of shape (2, 5)"),
    ("padding dtype", lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long)), TypeError,
     "key_padding_mask must be bool or floating point"),
    ("attn_mask shape", lambda m, x: m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool)), ValueError,
     "attn_mask must be a tensor of shape (5, 5) or (8, 5, 5)"),
    ("query not a tensor", lambda m, x: m(x.tolist(), x, x), TypeError, "query must be a torch.Tensor"),
]


@pytest.mark.parametrize("name, call, error, text", BAD_MHA_CALLS, ids=[c[0] for c in BAD_MHA_CALLS])
def test_bad_inputs_raise_clear_errors(name, call, error, text):
    fast = fastattn.nn.MultiheadAttention(E, H, batch_first=True)
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        call(fast, torch.randn(2, 5, E))


def test_bad_constructor_options():
    with pytest.raises(ValueError, match="window must be >= 0"):
        fastattn.nn.MultiheadAttention(E, H, window=-3)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fastattn.nn.MultiheadAttention(E, H, causal="yes")
    with pytest.raises(ValueError, match="num_heads .6. must be a multiple of num_kv_heads .4."):
        fastattn.nn.SelfAttention(E, 6, 4, head_dim=8)


# -- transformer layers -------------------------------------------------------------------------

def paired_layers(torch_cls, fast_cls, **options):
    torch.manual_seed(2)
    reference = torch_cls(E, H, dim_feedforward=48, dropout=0.0, **options)
    torch.manual_seed(2)
    fast = fast_cls(E, H, dim_feedforward=48, dropout=0.0, **options)
    for key, value in fast.state_dict().items():  # the same seed gives the same weights
        assert torch.equal(value, reference.state_dict()[key]), key
    assert fast.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(reference.state_dict())
    torch_cls(E, H, dim_feedforward=48, **options).load_state_dict(fast.state_dict())  # and back
    return reference, fast


def seq_tensor(batch_first, length, generator, dtype, batch=2):
    shape = (batch, length, E) if batch_first else (length, batch, E)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("masks_kind", ["none", "causal+padding", "causal+padding_float", "padding_float"])
def test_encoder_layer_matches_torch(batch_first, norm_first, masks_kind, fused_calls):
    reference, fast = paired_layers(torch.nn.TransformerEncoderLayer, fastattn.nn.TransformerEncoderLayer,
                                    batch_first=batch_first, norm_first=norm_first)

    def make(dtype):
        src = seq_tensor(batch_first, LQ, torch.Generator().manual_seed(3), dtype)
        kwargs = {}
        if masks_kind == "causal+padding":  # bool masks
            kwargs = {"src_key_padding_mask": make_padding("bool", 2, LQ, dtype), "src_mask": causal_bool(LQ),
                      "is_causal": True}
        elif masks_kind != "none":  # float 0/-inf masks, as nn.Transformer makes them
            kwargs["src_key_padding_mask"] = make_padding("float", 2, LQ, dtype)
            if masks_kind == "causal+padding_float":
                kwargs["src_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(LQ, dtype=dtype)
        return (src,), kwargs, [src]

    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAttnFallbackWarning)
        assert_equivalent(reference, fast, make)
    assert fused_calls


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_decoder_layer_matches_torch(batch_first, norm_first, fused_calls):
    reference, fast = paired_layers(torch.nn.TransformerDecoderLayer, fastattn.nn.TransformerDecoderLayer,
                                    batch_first=batch_first, norm_first=norm_first)

    def make(dtype):
        generator = torch.Generator().manual_seed(4)
        tgt, memory = seq_tensor(batch_first, LQ, generator, dtype), seq_tensor(batch_first, LK, generator, dtype)
        kwargs = {"tgt_mask": causal_bool(LQ), "tgt_is_causal": True,
                  "tgt_key_padding_mask": make_padding("bool", 2, LQ, dtype),
                  "memory_key_padding_mask": make_padding("bool", 2, LK, dtype)}
        return (tgt, memory), kwargs, [tgt, memory]

    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAttnFallbackWarning)
        assert_equivalent(reference, fast, make)
    assert len(fused_calls) == 2  # self-attention and cross-attention of fastattn's float32 run


def test_layers_with_dropout_in_training_match_torch_rng(fused_calls):
    """In training, attention dropout goes through the dense path, drawing the same dropout pattern
    as torch's, so a layer with the same seed equals torch's layer up to float32 rounding. (The
    feed-forward dropouts are off: torch's SDPA advances the RNG by a different amount than the
    pattern it draws, so later draws would differ although each is correct.)"""
    torch.manual_seed(0)
    reference = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.2, batch_first=True)
    fast = fastattn.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.2, batch_first=True)
    fast.load_state_dict(reference.state_dict())
    for layer in (reference, fast):
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = 0.0
    x = torch.randn(2, 6, E)
    torch.manual_seed(1)
    expected = reference(x)
    with pytest.warns(FastAttnFallbackWarning, match="attention dropout"):
        torch.manual_seed(1)
        actual = fast(x)
    torch.testing.assert_close(actual, expected)


def test_encoder_layer_window_option(fused_calls):
    torch.manual_seed(0)
    layer = fastattn.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True, window=(2, 0))
    reference = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, E)
    allowed = fastattn.masks.materialize(9, 9, (2, 0))
    torch.testing.assert_close(layer(x), reference(x, src_mask=~allowed))
    assert fused_calls[0]["window"] == (2, 0)


def test_encoder_stack_in_eval_mode_uses_fastattn(fused_calls):
    """nn.TransformerEncoder's nested-tensor path and the layer's fused fast path would bypass the
    attention module in eval/no_grad; fastattn's layer opts out of both."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="enable_nested_tensor"):
        stack = torch.nn.TransformerEncoder(
            fastattn.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, batch_first=True), num_layers=2)
    stack.eval()
    x = torch.randn(2, 6, E)
    padding = make_padding("bool", 2, 6, torch.float32)
    with torch.no_grad():
        out = stack(x, src_key_padding_mask=padding)
    assert len(fused_calls) == 2
    reference = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, batch_first=True), num_layers=2,
        enable_nested_tensor=False)
    reference.load_state_dict(stack.state_dict())
    reference.eval()
    with torch.no_grad():
        expected = reference(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected)


# -- swap_attention -----------------------------------------------------------------------------

def make_transformer(batch_first):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch's note that nested tensors need batch_first
        warnings.simplefilter("ignore", UserWarning)
        return torch.nn.Transformer(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2,
                                    dim_feedforward=48, dropout=0.0, batch_first=batch_first)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_swap_attention_leaves_transformer_outputs_unchanged(batch_first, fused_calls):
    reference = make_transformer(batch_first)
    swapped = copy.deepcopy(reference)
    params_before = [id(p) for p in swapped.parameters()]
    assert fastattn.swap_attention(swapped) == 6  # 2 encoder self, 2 decoder self, 2 decoder cross
    assert fastattn.swap_attention(swapped) == 0  # idempotent
    assert [id(p) for p in swapped.parameters()] == params_before  # the same Parameter objects
    assert all(type(m) is not torch.nn.MultiheadAttention for m in swapped.modules())

    def make(dtype):
        generator = torch.Generator().manual_seed(6)
        src, tgt = seq_tensor(batch_first, LK, generator, dtype), seq_tensor(batch_first, LQ, generator, dtype)
        kwargs = {"tgt_mask": torch.nn.Transformer.generate_square_subsequent_mask(LQ, dtype=dtype),
                  "tgt_is_causal": True, "src_key_padding_mask": make_padding("float", 2, LK, dtype),
                  "memory_key_padding_mask": make_padding("float", 2, LK, dtype)}
        return (src, tgt), kwargs, [src, tgt]

    with warnings.catch_warnings():
        warnings.simplefilter("error", FastAttnFallbackWarning)
        assert_equivalent(reference, swapped, make)
    assert fused_calls


def test_swap_attention_in_eval_no_grad_really_runs_fastattn(fused_calls):
    """torch's encoder fast path (nested tensors, fused layer) is turned off for swapped layers, so
    a window given to swap_attention is honoured in inference too."""
    reference = make_transformer(batch_first=True).eval()
    swapped = copy.deepcopy(reference)
    fastattn.swap_attention(swapped)
    src, tgt = torch.randn(2, LK, E), torch.randn(2, LQ, E)
    padding = make_padding("bool", 2, LK, torch.float32)
    with torch.no_grad():
        expected = reference(src, tgt, src_key_padding_mask=padding, memory_key_padding_mask=padding)
        actual = swapped(src, tgt, src_key_padding_mask=padding, memory_key_padding_mask=padding)
    assert len(fused_calls) == 6
    torch.testing.assert_close(actual, expected)
    windowed = copy.deepcopy(reference)
    fastattn.swap_attention(windowed, window=(1, 1))
    with torch.no_grad():
        assert not torch.allclose(windowed(src, tgt), reference(src, tgt))
    assert all(call["window"] == (1, 1) for call in fused_calls[6:])


def test_swap_attention_arguments():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert fastattn.swap_attention(model) == 0
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastattn.swap_attention("model")
    mha = torch.nn.MultiheadAttention(E, H)
    with pytest.raises(ValueError, match="window must be >= 0"):
        fastattn.swap_attention(torch.nn.Sequential(mha), window=-5)
    assert type(mha) is torch.nn.MultiheadAttention  # nothing changed on error


# -- SelfAttention ------------------------------------------------------------------------------

def self_attention_reference(module, x, key_padding_mask, dtype):
    """The same module's weights through torch's SDPA with a dense mask, in `dtype`."""
    m = copy.deepcopy(module).to(dtype)
    batch, seqlen, _ = x.shape
    sizes = [m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.num_kv_heads * m.head_dim]
    q, k, v = (t.unflatten(-1, (-1, m.head_dim)).transpose(1, 2) for t in m.qkv_proj(x.to(dtype)).split(sizes, -1))
    group = m.num_heads // m.num_kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = fastattn.masks.materialize(seqlen, seqlen, m.window_left_right, key_padding_mask=key_padding_mask)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return m.out_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))


@pytest.mark.parametrize("heads, kv_heads, causal, window", [
    (4, 4, False, None), (4, 2, True, None), (4, 1, False, (2, 1)), (8, 2, True, 3)])
def test_self_attention_gqa_causal_window(heads, kv_heads, causal, window):
    torch.manual_seed(0)
    module = fastattn.nn.SelfAttention(E, heads, kv_heads, causal=causal, window=window)
    assert module.qkv_proj.out_features == (heads + 2 * kv_heads) * (E // heads)
    x = torch.randn(2, 11, E)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 1:3] = True  # two padded keys in batch 1; every query still sees key 0
    out = module(x, key_padding_mask=padding)
    oracle = self_attention_reference(module, x.double(), padding, torch.float64)
    base = self_attention_reference(module, x, padding, torch.float32)
    assert_close_to_oracle(out.detach(), oracle.detach(), base.detach(), factor=OUTPUT_FACTOR)


def test_copy_task_example_runs(tmp_path):
    """examples/copy_task.py end to end on a tiny problem (the real run takes minutes)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "copy_task.py"
    spec = importlib.util.spec_from_file_location("copy_task", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    try:
        runs = example.main(["--length", "6", "--window", "2", "--steps", "4", "--batch", "8", "--dim", "16",
                             "--log-every", "2", "--out", ""])
    finally:
        torch.set_num_threads(threads)
    assert len(runs) == 2
    for history in runs.values():
        assert history["step"] == [2, 4] and 0.0 <= history["final_accuracy"][0] <= 1.0
