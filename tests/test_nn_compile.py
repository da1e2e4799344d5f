"""torch.compile(fullgraph=True) over a model built from fastattn.nn modules: no graph break, the
fused op in the graph, and the same outputs and gradients as eager.

Tolerance: the eager model in float64 is the oracle and the eager float32 model the yardstick
(fastattn.testing's rule); compiled float32 must be as close as 2x (outputs) / 3x (gradients).
"""

import copy

import pytest
import torch

import fastattn
from fastattn.testing import GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_oracle

VOCAB, E, H, N = 40, 32, 4, 10


class TinyModel(torch.nn.Module):
    """One of each module, each with a different mask kind."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, E)
        self.encoder = fastattn.nn.TransformerEncoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True,
                                                           window=(3, 0))
        self.gqa = fastattn.nn.SelfAttention(E, 4, 2, causal=True)
        self.mha = fastattn.nn.MultiheadAttention(E, H, batch_first=True)
        self.decoder = fastattn.nn.TransformerDecoderLayer(E, H, dim_feedforward=48, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(E, VOCAB)

    def forward(self, ids, padding, causal_mask):
        x = self.embed(ids)
        x = self.encoder(x, src_key_padding_mask=padding, is_causal=True)  # causal, within a window of 3
        x = x + self.gqa(x, key_padding_mask=padding)
        # a causal attn_mask with torch's is_causal hint: trusted under compile, as torch does
        x = x + self.mha(x, x, x, key_padding_mask=padding, attn_mask=causal_mask, need_weights=False,
                         is_causal=True)[0]
        x = self.decoder(x, x, tgt_is_causal=True, memory_key_padding_mask=padding)
        return self.head(x)


def inputs():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, N), generator=generator)
    padding = torch.zeros(2, N, dtype=torch.bool)
    padding[1, -3:] = True
    return ids, padding, torch.ones(N, N, dtype=torch.bool).triu(1)


def forward_backward(model, args):
    logits = model(*args)
    cotangent = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((logits * cotangent.to(logits.dtype)).sum(), list(model.parameters()))
    return logits.detach(), grads


def assert_matches_eager(compiled_result, model, args):
    oracle = forward_backward(copy.deepcopy(model).double(), args)
    base = forward_backward(model, args)
    assert_close_to_oracle(compiled_result[0], oracle[0], base[0], factor=OUTPUT_FACTOR, name="logits")
    for (name, _), actual, expected, yardstick in zip(model.named_parameters(), compiled_result[1], oracle[1], base[1]):
        assert_close_to_oracle(actual, expected, yardstick, factor=GRAD_FACTOR, name=f"grad {name}")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyModel()


def test_compile_fullgraph_aot_eager_forward_backward(model):
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recording_backend)  # raises on any graph break
    args = inputs()
    result = forward_backward(compiled, args)
    assert len(graphs) == 1
    # five attention calls (encoder, GQA, MHA, decoder self and cross), each the fused custom op
    bodies = [module for name, module in graphs[0].named_children() if name.startswith("fwd_body_")]
    assert len(bodies) == 5
    assert all("torch.ops.fastattn.fwd" in body.code for body in bodies), bodies[0].code
    assert_matches_eager(result, model, args)
    # the aot_eager backend named by the issue gives the same
    torch._dynamo.reset()
    again = forward_backward(torch.compile(model, fullgraph=True, backend="aot_eager"), args)
    torch.testing.assert_close(again[0], result[0], rtol=0, atol=0)


def test_compile_fullgraph_inductor(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    args = inputs()
    assert_matches_eager(forward_backward(compiled, args), model, args)
