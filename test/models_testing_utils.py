"""Helpers shared by the test_models_*.py files (not a test module itself)."""
import torch


def assert_all_params_get_grads(module: torch.nn.Module, loss: torch.Tensor, skip=()) -> None:
    """Backpropagate ``loss`` and check that every trainable parameter of ``module`` (except
    names starting with an entry of ``skip``) gets a finite, not entirely zero gradient."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    missing, zero, bad = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad or name.startswith(tuple(skip)):
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all():
            bad.append(name)
        elif p.grad.abs().max() == 0:
            zero.append(name)
    assert not missing, f"no gradient: {missing}"
    assert not bad, f"non-finite gradient: {bad}"
    assert not zero, f"all-zero gradient: {zero}"


def perturb_padding(cells, generator: torch.Generator):
    """A copy of a CellBatch whose padded slots hold random garbage (mask unchanged)."""
    from spatialoc_ros.models.cell_tensors import CellBatch

    pad = ~cells.mask
    g = generator

    def noisy(t, scale=5.0):
        noise = torch.randn(t.shape, generator=g) * scale
        m = pad.view(*pad.shape, *([1] * (t.dim() - 2)))
        return torch.where(m, noise, t)

    return CellBatch(
        xyz=noisy(cells.xyz),
        rgb=noisy(cells.rgb),
        class_idx=torch.where(pad, torch.randint(0, 21, pad.shape, generator=g), cells.class_idx),
        color=noisy(cells.color),
        center=noisy(cells.center),
        num_points=torch.where(pad, torch.full(pad.shape, 777.0), cells.num_points),
        mask=cells.mask.clone(),
    )
