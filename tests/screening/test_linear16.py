"""The 16-bit linear backward of gradient scores (first_order._Linear16): the same gradients as
PyTorch's own backward to bfloat16 rounding, the forward bit for bit, the modules restored, and no
change for float32 models."""

import torch

from conftest import tiny_model
from weightpatch.screening.first_order import fast_16bit_linear_backward


def grads(model, ids, fast):
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    if fast:
        with fast_16bit_linear_backward(model):
            out = model(ids).logits
            out.float().pow(2).sum().backward()
    else:
        out = model(ids).logits
        out.float().pow(2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_bfloat16_gradients_agree_to_rounding_and_modules_are_restored():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    (native_out, native), (fast_out, fast) = grads(model, ids, False), grads(model, ids, True)
    assert torch.equal(native_out, fast_out)
    for name, g in native.items():
        rel = (g.float() - fast[name].float()).norm() / g.float().norm()
        assert rel < 2**-6, (name, float(rel))  # a few bfloat16 roundings (eps 2^-7)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_float32_models_keep_the_native_backward():
    model = tiny_model("llama")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    native, fast = grads(model, ids, False)[1], grads(model, ids, True)[1]
    assert all(torch.equal(native[n], fast[n]) for n in native)
