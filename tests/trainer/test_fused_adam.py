"""train.fused_adam: torch AdamW's fused kernel is switched on per param group where every
parameter is on CUDA, survives a checkpoint load that replaces the groups, and gives the foreach
step's result."""

import pytest
import torch

from msa_train.trainer.optimizer_state import fused_adam_enabled, set_fused_adam


class _Sub:  # the shape of a Megatron (sub-)optimizer: the torch optimizer under .optimizer
    def __init__(self, params):
        self.optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(device)) for n in (7, 33, 128)]


def _steps(sub, params, n=3):
    for i in range(n):
        for p in params:
            p.grad = torch.sin(p.detach() * (i + 1))
        sub.optimizer.step()


def test_cpu_parameters_keep_the_foreach_step():
    params = _params("cpu")
    sub = _Sub(params)
    set_fused_adam(sub, True)
    assert not fused_adam_enabled(sub)
    assert not sub.optimizer.param_groups[0]["fused"]
    _steps(sub, params)  # still runs


@pytest.mark.gpu
def test_fused_step_on_cuda_matches_foreach_and_survives_a_load():
    ref_params, fused_params = _params("cuda"), _params("cuda")
    ref, fused = _Sub(ref_params), _Sub(fused_params)
    set_fused_adam(fused, True)
    assert fused_adam_enabled(fused) and fused.optimizer.param_groups[0]["foreach"] is False
    _steps(ref, ref_params)
    _steps(fused, fused_params)
    for a, b in zip(ref_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # A checkpoint load replaces the groups (fused=False) and leaves CPU step tensors behind.
    state = fused.optimizer.state_dict()
    for s in state["state"].values():
        s["step"] = s["step"].cpu()
    state["param_groups"][0]["fused"] = False
    was_on = fused_adam_enabled(fused)
    fused.optimizer.load_state_dict(state)
    set_fused_adam(fused, was_on)
    assert fused_adam_enabled(fused)
    assert all(s["step"].is_cuda for s in fused.optimizer.state.values())
    _steps(fused, fused_params, n=1)
    _steps(ref, ref_params, n=1)
    for a, b in zip(ref_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
