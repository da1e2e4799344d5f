"""attn_implementation="fastattn" on small random transformers models (no downloads) against "eager".

Tolerance (the rule of fastattn.testing): the eager model in float64 with the same weights is the
oracle; fastattn's float32 error must be at most 2x (logits) / 3x (gradients) the error of the
float32 eager model, plus the rounding floor. Logits are compared at real (non-padding) tokens:
a query at a left-padding position sees no key, which fastattn answers with 0 and eager with an
arbitrary finite value; no other position reads it.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency "
                                                          "(pip install 'fastattn[hf]')")
from transformers import masking_utils  # noqa: E402

from fastattn import FastAttnFallbackWarning, functional  # noqa: E402
from fastattn.integrations import huggingface as fa_hf  # noqa: E402
from fastattn.nn import _dense  # noqa: E402
from fastattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_oracle  # noqa: E402

VOCAB, SEQ = 64, 12
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
                                   resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llama_gqa_config():
    return transformers.LlamaConfig(num_key_value_heads=2, **SMALL)


def mistral_sliding_config():
    return transformers.MistralConfig(num_key_value_heads=1, sliding_window=4, **SMALL)


def qwen2_hybrid_config():
    # layer 0 full attention, layer 1 sliding window of 5: two different masks in one model
    return transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1, layer_types=["full_attention", "sliding_attention"], **SMALL)


CONFIGS = {
    "gpt2": (gpt2_config, transformers.GPT2LMHeadModel, [(-1, 0)]),
    "llama-gqa": (llama_gqa_config, transformers.LlamaForCausalLM, [(-1, 0)]),
    "mistral-gqa-sliding": (mistral_sliding_config, transformers.MistralForCausalLM, [(3, 0)]),
    "qwen2-hybrid-sliding": (qwen2_hybrid_config, transformers.Qwen2ForCausalLM, [(-1, 0), (4, 0)]),
}


@pytest.fixture(autouse=True)
def registered():
    fa_hf.register()


@pytest.fixture
def fused_calls(monkeypatch):
    """Records (q shape, k shape, window, padded?) of every fused call; re-arms one-time warnings."""
    calls = []
    real = functional.attention

    def recording(q, k, v, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), kwargs.get("window"), kwargs.get("key_padding_mask") is not None))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(functional, "attention", recording)
    monkeypatch.setattr(_dense, "_warned_reasons", set())
    return calls


def build_pair(name):
    """The eager model and the fastattn model with the same random weights."""
    make_config, model_cls, _ = CONFIGS[name]
    torch.manual_seed(0)
    eager = model_cls._from_config(make_config(), attn_implementation="eager").eval()
    fast = model_cls._from_config(make_config(), attn_implementation="fastattn").eval()
    assert fast.config._attn_implementation == "fastattn"
    assert eager.config._attn_implementation == "eager"
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def batch_inputs(padding_side, batch=3):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, SEQ), generator=generator)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    for row, pad in enumerate([0, 3, 7][:batch]):
        if pad:
            if padding_side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, SEQ - pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def eager_copies(eager):
    return copy.deepcopy(eager).double(), eager


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_eager_with_padding(name, padding_side, fused_calls):
    eager, fast = build_pair(name)
    ids, mask = batch_inputs(padding_side)
    oracle_model, base_model = eager_copies(eager)
    with torch.no_grad():
        oracle = oracle_model(ids, attention_mask=mask).logits
        base = base_model(ids, attention_mask=mask).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastAttnFallbackWarning)  # every layer fused
            actual = fast(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close_to_oracle(actual[real], oracle[real], base[real], factor=OUTPUT_FACTOR, name="logits")
    expected_windows = CONFIGS[name][2]
    assert len(fused_calls) == 2  # one per layer
    assert sorted({call[2] for call in fused_calls}) == sorted(expected_windows)
    assert all(call[3] for call in fused_calls)  # the padding mask reached the kernel
    assert all(call[0][2] == call[1][2] == SEQ for call in fused_calls)
    # GQA: key/value heads reach the kernel unrepeated
    assert fused_calls[0][1][1] == getattr(fast.config, "num_key_value_heads", fast.config.num_attention_heads)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-gqa-sliding"])
def test_training_step_gradients_match_eager(name, fused_calls):
    eager, fast = build_pair(name)
    ids, mask = batch_inputs("left")
    # The causal-LM loss predicts token t+1 from position t, so the first real token of a
    # left-padded row would be predicted from a padding position, whose attention output is
    # arbitrary in eager (it sees no key) and 0 in fastattn: mask that label out as well.
    predicted_from_padding = torch.nn.functional.pad(mask[:, :-1] == 0, (1, 0), value=False)
    labels = ids.masked_fill((mask == 0) | predicted_from_padding, -100)
    oracle_model, base_model = eager_copies(eager)
    results = {}
    for key, model in (("oracle", oracle_model), ("base", base_model), ("fast", fast)):
        model.train()
        output = model(ids, attention_mask=mask, labels=labels)
        grads = torch.autograd.grad(output.loss, list(model.parameters()))
        results[key] = (output.logits.detach()[mask.bool()], dict(zip([n for n, _ in model.named_parameters()], grads)))
    assert fused_calls
    # (the logits, not the scalar loss: one number's error is too much a matter of luck to compare)
    assert_close_to_oracle(results["fast"][0], results["oracle"][0], results["base"][0], factor=OUTPUT_FACTOR,
                           name="logits")
    for param_name, grad in results["fast"][1].items():
        assert_close_to_oracle(grad, results["oracle"][1][param_name], results["base"][1][param_name],
                               factor=GRAD_FACTOR, name=param_name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_with_kv_cache_matches_eager(name, fused_calls):
    """Greedy decoding of a left-padded batch with a KV cache: each decode step is one query
    against the whole cache (bottom-right alignment). The reference is eager decoding of each
    prompt alone, without padding (eager's own padded batch is not a reference: a query that sees
    no key gets -inf scores in float64, whose NaN then spreads through the cache)."""
    eager, fast = build_pair(name)
    ids, mask = batch_inputs("left")
    settings = dict(max_new_tokens=6, do_sample=False, use_cache=True, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastAttnFallbackWarning)
            actual = fast.generate(ids, attention_mask=mask, **settings)
        references = {}
        for key, model in zip(("oracle", "base"), eager_copies(eager)):
            runs = [model.generate(ids[row:row + 1, mask[row] == 1], **settings) for row in range(ids.shape[0])]
            references[key] = ([run.sequences[0, -6:] for run in runs],
                               [torch.cat([run.logits[step] for run in runs]) for step in range(6)])
    new_tokens = actual.sequences[:, -6:]
    assert all(torch.equal(new_tokens[row], tokens) for row, tokens in enumerate(references["oracle"][0]))
    for step in range(6):
        assert_close_to_oracle(actual.logits[step], references["oracle"][1][step], references["base"][1][step],
                               factor=OUTPUT_FACTOR, name=f"logits of step {step}")
    decode_steps = [call for call in fused_calls if call[0][2] == 1]
    assert len(decode_steps) == 2 * 5  # 2 layers x 5 one-token steps after the prompt
    assert all(call[1][2] > 1 for call in decode_steps)  # one query against the cache


def test_custom_4d_mask_falls_back_to_sdpa_and_matches_eager(fused_calls):
    """A dense 4-D mask given by the user is never dropped: it goes to transformers' SDPA."""
    eager, fast = build_pair("llama-gqa")
    ids, _ = batch_inputs("left")
    allowed = torch.rand(SEQ, SEQ, generator=torch.Generator().manual_seed(3)) < 0.6
    allowed |= torch.eye(SEQ, dtype=torch.bool)
    additive = torch.zeros(1, 1, SEQ, SEQ).masked_fill(~allowed, torch.finfo(torch.float32).min).expand(3, 1, SEQ, SEQ)
    oracle_model, base_model = eager_copies(eager)
    with torch.no_grad():
        oracle = oracle_model(ids, attention_mask=additive.double()).logits
        base = base_model(ids, attention_mask=additive).logits
        with pytest.warns(FastAttnFallbackWarning, match="dense tensor"):
            actual = fast(ids, attention_mask=additive).logits
    assert not fused_calls
    assert_close_to_oracle(actual, oracle, base, factor=OUTPUT_FACTOR, name="logits")


def test_packed_sequences_fall_back_and_match_eager(fused_calls):
    """position_ids that restart (packed sequences) add a pattern fastattn does not express: the
    mask function returns transformers' dense mask instead of dropping it."""
    eager, fast = build_pair("llama-gqa")
    ids = torch.randint(3, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(4))
    position_ids = torch.cat([torch.arange(5), torch.arange(SEQ - 5)]).unsqueeze(0)
    oracle_model, base_model = eager_copies(eager)
    with torch.no_grad():
        oracle = oracle_model(ids, position_ids=position_ids, use_cache=False).logits
        base = base_model(ids, position_ids=position_ids, use_cache=False).logits
        with pytest.warns(FastAttnFallbackWarning):
            actual = fast(ids, position_ids=position_ids, use_cache=False).logits
    assert not fused_calls
    assert_close_to_oracle(actual, oracle, base, factor=OUTPUT_FACTOR, name="logits")
    # the second sequence must not see the first: its logits differ from running it unpacked
    with torch.no_grad():
        alone = fast(ids[:, 5:]).logits
    torch.testing.assert_close(actual[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_attention_dropout_in_training_uses_sdpa():
    config = gpt2_config()
    config.attn_pdrop = 0.3
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="fastattn").train()
    ids, mask = batch_inputs("left")
    _dense._warned_reasons.clear()
    with pytest.warns(FastAttnFallbackWarning, match="attention dropout"):
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits[mask.bool()]).all()


MASK_GRID = [
    # (q_length, kv_length, q_offset, kv_offset, mask factory)
    (7, 7, 0, 0, "causal"), (1, 9, 8, 0, "causal"), (3, 12, 9, 0, "causal"), (7, 7, 0, 0, "sliding3"),
    (1, 4, 10, 7, "sliding4"), (2, 5, 9, 6, "sliding4"), (6, 6, 0, 0, "bidirectional"),
    (6, 6, 0, 0, "sliding_bidirectional2"), (5, 8, 3, 0, "sliding3"),
]


def factory(kind):
    if kind == "causal":
        return masking_utils.causal_mask_function
    if kind == "bidirectional":
        return masking_utils.bidirectional_mask_function
    if kind.startswith("sliding_bidirectional"):
        return masking_utils.sliding_window_bidirectional_mask_function(int(kind[-1]))
    return masking_utils.sliding_window_causal_mask_function(int(kind[-1]))


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("q_length, kv_length, q_offset, kv_offset, kind", MASK_GRID)
def test_mask_function_equals_transformers_dense_mask(q_length, kv_length, q_offset, kv_offset, kind, with_padding):
    """The compact mask, materialized, is exactly transformers' own boolean mask -- with cache
    offsets (decode steps, sliding-window caches) and padding."""
    total = kv_offset + kv_length
    padding = None
    if with_padding:
        padding = torch.ones(2, total, dtype=torch.bool)
        padding[1, :3] = False
    args = dict(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                mask_function=factory(kind), attention_mask=padding)
    compact = fa_hf.mask_function(**args)
    assert isinstance(compact, fa_hf.FastAttnMask)
    expected = masking_utils.sdpa_mask(**args, allow_is_causal_skip=False)
    torch.testing.assert_close(compact.materialize().expand_as(expected), expected, rtol=0, atol=0)


def test_unrecognised_mask_functions_get_the_dense_mask():
    chunked = masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    custom = masking_utils.and_masks(masking_utils.causal_mask_function, lambda b, h, q, kv: kv % 2 == 0)
    for fn in (chunked, custom, masking_utils.or_masks(masking_utils.causal_mask_function)):
        assert fa_hf.pattern_of(fn) is None
        args = dict(batch_size=2, q_length=6, kv_length=6, mask_function=fn)
        dense = fa_hf.mask_function(**args)
        assert isinstance(dense, torch.Tensor) and dense.dtype == torch.bool
        torch.testing.assert_close(dense, masking_utils.sdpa_mask(**args, allow_is_causal_skip=False))
    assert fa_hf.pattern_of(masking_utils.sliding_window_causal_mask_function(4)) == (3, 0)
    assert fa_hf.pattern_of(masking_utils.causal_mask_function) == (-1, 0)
