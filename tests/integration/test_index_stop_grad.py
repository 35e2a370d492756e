"""attention.index_stop_grad: true (default) keeps the KL away from the backbone; false (ablation)
lets the KL's gradient reach it through the index branch's input, and changes nothing else."""

import pytest
import torch

from .test_kl_accounting import build, tokens_batch


def grads(stop_grad: bool, kl_coeff: float, mode: str):
    from msa_train.model import set_kl_loss_scale, set_msa_mode

    model = build(kl_coeff, moe=False, index_stop_grad=stop_grad)
    assert model.config.msa_index_stop_grad is stop_grad
    set_msa_mode(model, mode)
    set_kl_loss_scale(1.0)
    tokens = tokens_batch()
    loss = model(tokens, None, None, labels=tokens).float().mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_without_stop_grad_the_kl_reaches_the_backbone(megatron_1rank, mode):
    loss_sg, with_sg = grads(True, 0.5, mode)
    loss_no, without = grads(False, 0.5, mode)
    assert loss_sg == loss_no  # the forward is the same either way
    backbone = [n for n in with_sg if ".indexer." not in n]
    # The layer inputs of the MSA layers (and everything before them) now feel the KL.
    changed = [n for n in backbone if not torch.equal(with_sg[n], without[n])]
    assert any("layers.0." in n for n in changed), changed
    assert any("layers.1.input_layernorm" in n for n in changed), changed
    # The index weights' own gradient does not depend on where the input's gradient goes.
    for n in with_sg:
        if ".indexer." in n:
            torch.testing.assert_close(with_sg[n], without[n], rtol=0, atol=0, msg=n)


def test_without_kl_the_stop_grad_flag_changes_nothing(megatron_1rank):
    _, with_sg = grads(True, 0.0, "sparse")
    _, without = grads(False, 0.0, "sparse")
    assert with_sg.keys() == without.keys()
    for n in with_sg:
        torch.testing.assert_close(with_sg[n], without[n], rtol=0, atol=0, msg=n)
