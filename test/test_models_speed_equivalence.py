"""The fast forms of the PointNet++, BEOSE and the 'mlp' PointNet compute what their plain forms do.

Each reference below is the straightforward computation (the code before the speed work): padded
balls and a max over them for the set abstraction, Bezier points fed to the curve Linear for
BEOSE, ReLU before the max for the PointNet. The fast modules are run with the same parameters;
forward values, every parameter gradient and the BatchNorm running statistics must agree in
float64 to round-off (ties between duplicated points included), and in float32 no worse than the
reference's own float32 round-off.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from spatialoc_ros.models import beose as beose_module
from spatialoc_ros.models import object_encoder as oe
from spatialoc_ros.models.beose import BEOSE
from spatialoc_ros.models.layers import masked_softmax

#: Relative agreement (norm of the difference / norm of the reference) required in float64.
F64_RTOL = 1e-9


# ------------------------------------------------------------------ references


@torch.no_grad()
def reference_fps(pos, count):
    N, P, _ = pos.shape
    chosen = torch.zeros(N, count, dtype=torch.long)
    nearest = torch.full((N, P), float("inf"), dtype=pos.dtype)
    rows = torch.arange(N)
    last = torch.zeros(N, dtype=torch.long)
    for i in range(1, count):
        d = ((pos - pos[rows, last].unsqueeze(1)) ** 2).sum(-1)
        nearest = torch.minimum(nearest, d)
        last = nearest.argmax(dim=1)
        chosen[:, i] = last
    return chosen


def _gather(values, index):
    N = values.shape[0]
    flat = index.reshape(N, -1)
    return values.gather(1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1])).view(*index.shape, values.shape[-1])


def reference_set_abstraction(sa, x, pos):
    """Padded balls (K = the fullest ball), the module's own MLP on the real members, max over K."""
    N, P, _ = pos.shape
    M = max(1, math.ceil(sa.ratio * P))
    centres = _gather(pos, reference_fps(pos, M))
    d2 = torch.cdist(centres, pos).pow(2)
    K = int((d2 <= sa.radius ** 2).sum(dim=-1).max().clamp(1, sa.max_neighbors))
    d2_k, neighbours = d2.topk(K, dim=-1, largest=False)
    inside = d2_k <= sa.radius ** 2
    inside[..., 0] = True
    offsets = _gather(pos, neighbours) - centres.unsqueeze(2)
    grouped = torch.cat([_gather(x, neighbours), offsets], dim=-1)
    messages = sa.mlp(grouped[inside])
    out = messages.new_full((N, M, K, sa.out_dim), float("-inf"))
    out[inside] = messages
    return out.max(dim=2).values, centres


def reference_pointnet2(net, xyz, rgb, center):
    lead, P = xyz.shape[:-2], xyz.shape[-2]
    pos = (xyz - center.unsqueeze(-2)).reshape(-1, P, 3)
    x = rgb.reshape(-1, P, 3)
    scale = pos.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-9)
    pos = pos * (0.999999 / scale)
    for layer in net.set_abstractions:
        x, pos = reference_set_abstraction(layer, x, pos)
    ga = net.global_abstraction
    N, M, _ = x.shape
    h = ga.mlp(torch.cat([x, pos], dim=-1).reshape(N * M, -1)).view(N, M, ga.out_dim).max(dim=1).values
    h = F.relu(net.fc2(F.relu(net.fc1(h))))
    return h.view(*lead, net.out_dim)


def reference_beose_layer(layer, x, pair, offset, length, pair_mask, object_mask):
    points = layer.curve_points(pair, offset, length)
    curve = layer.curve(points.flatten(-2))
    update = curve + layer.pair_self(pair) + layer.from_i(x).unsqueeze(2) + layer.from_j(x).unsqueeze(1)
    pair = layer.pair_norm(pair + torch.tanh(update))
    sigma = layer.log_sigma.exp()
    logits = layer.score(pair).squeeze(-1) - length.squeeze(-1).square() / (2 * sigma * sigma)
    weights = masked_softmax(logits, pair_mask, dim=-1)
    pooled = torch.einsum("bij,bijr->bir", weights, pair)
    x = layer.object_norm(x + layer.to_object(pooled))
    keep = object_mask.unsqueeze(-1).to(x.dtype)
    return x * keep, pair, pooled * keep


def reference_beose(beose, x, center, mask):
    O = x.shape[1]
    offset = center.unsqueeze(1) - center.unsqueeze(2)
    length = offset.norm(dim=-1, keepdim=True)
    pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1) & ~torch.eye(O, dtype=torch.bool)
    keep = mask.unsqueeze(-1).to(x.dtype)
    x = x * keep
    pair = beose.geometry(torch.cat([offset, length], dim=-1))
    pair = pair + beose.init_i(x).unsqueeze(2) + beose.init_j(x).unsqueeze(1)
    pooled = x.new_zeros(x.shape[0], O, pair.shape[-1])
    for layer in beose.layers:
        x, pair, pooled = reference_beose_layer(layer, x, pair, offset, length, pair_mask, mask)
    return x, beose.relation_out(pooled) * keep


def reference_pointnet(net, xyz, rgb, center):
    points = torch.cat([xyz - center.unsqueeze(-2), rgb], dim=-1)
    return net.point_mlp(points).max(dim=-2).values


# ------------------------------------------------------------------ helpers


def _objects(n, points, generator, distinct=None):
    """n objects of ``points`` points (xyz around a centre, rgb); ``distinct``: sample the points
    from that many distinct ones, with replacement (duplicates, as sampling a small object without
    jitter gives)."""
    g = generator
    center = torch.rand(n, 3, generator=g)
    spread = 0.02 + 0.1 * torch.rand(n, 1, 1, generator=g)
    xyz = center.unsqueeze(1) + spread * torch.randn(n, points, 3, generator=g)
    rgb = torch.rand(n, points, 3, generator=g)
    if distinct is not None:
        pick = torch.randint(0, distinct, (n, points), generator=g).unsqueeze(-1).expand(-1, -1, 3)
        xyz, rgb = xyz.gather(1, pick), rgb.gather(1, pick)
    return xyz, rgb, center


def _randomise_norms(module, generator):
    """BatchNorm weights of both signs, random biases and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))


def _run(module, forward, inputs, weights):
    """forward(module, *inputs) -> (output, {name: grad}, {name: buffer}) for the loss sum(w * out)."""
    module.zero_grad(set_to_none=True)
    out = forward(module, *inputs)
    (out * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads, {k: b.clone() for k, b in module.named_buffers()}


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _compare(fast, slow, rtol):
    """Worst relative differences of outputs, parameter gradients and buffers."""
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = fast, slow
    assert grads_a.keys() == grads_b.keys()
    # a Linear bias right before a BatchNorm has a zero gradient in exact arithmetic: compare it
    # against the scale of all the gradients, not its own round-off
    scale = max(float(g.norm()) for g in grads_b.values())
    worst = {"output": _rel(out_a, out_b)}
    worst["gradient"] = max(float((grads_a[k] - grads_b[k]).norm()) / max(float(grads_b[k].norm()), 1e-3 * scale)
                            for k in grads_b)
    worst["buffers"] = max([_rel(bufs_a[k].double(), bufs_b[k].double()) for k in bufs_b], default=0.0)
    for name, value in worst.items():
        assert value <= rtol, f"{name} differs by {value:.3g} (allowed {rtol:.3g})"
    return worst


def _twins(make, dtype, generator):
    """Two identical modules (one to run fast, one for the reference), norms randomised."""
    a = make().to(dtype)
    _randomise_norms(a, generator)
    b = make().to(dtype)
    b.load_state_dict(a.state_dict(), strict=True)
    return a, b


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("distinct", [None, 5])
def test_farthest_point_sample_is_bitwise_the_plain_loop(distinct):
    xyz, _, center = _objects(7, 40, torch.Generator().manual_seed(0), distinct=distinct)
    pos = xyz - center.unsqueeze(1)
    for count in (1, 2, 20, 40):
        assert torch.equal(oe.farthest_point_sample(pos, count), reference_fps(pos, count))


def _pointnet2_cases():
    # (objects, points, distinct points or None): duplicates give exact ties in every max; one
    # object of one point gives one-row BatchNorm batches (the running-statistics fall-back)
    return [(6, 32, None), (6, 32, 4), (1, 1, None), (3, 9, 2)]


@pytest.mark.parametrize("case", _pointnet2_cases())
@pytest.mark.parametrize("train", [True, False])
def test_pointnet2_matches_padded_balls_in_float64(case, train):
    n, points, distinct = case
    g = torch.Generator().manual_seed(1)
    fast, slow = _twins(lambda: oe.PointNet2(out_dim=24), torch.float64, g)
    fast.train(train), slow.train(train)
    inputs = [t.double() for t in _objects(n, points, g, distinct)]
    weights = torch.randn(n, 24, generator=g, dtype=torch.float64)
    _compare(_run(fast, lambda m, *i: m(*i), inputs, weights),
             _run(slow, reference_pointnet2, inputs, weights), F64_RTOL)
    assert torch.equal(fast.global_abstraction.mlp[0].norm.num_batches_tracked,
                       slow.global_abstraction.mlp[0].norm.num_batches_tracked)


def test_pointnet2_float32_round_off_is_the_references():
    """float32 against a float64 run: the fast form's errors are of the reference's size (ReLU
    masks flipped by round-off make them input-dependent: allow 10x, measured 0.3x-4.5x)."""
    g = torch.Generator().manual_seed(2)
    exact, _ = _twins(lambda: oe.PointNet2(out_dim=24), torch.float64, g)
    start = copy.deepcopy(exact)  # the running statistics before the step
    inputs = _objects(8, 64, g, distinct=12)
    weights = torch.randn(8, 24, generator=g)
    truth = _run(exact, reference_pointnet2, [t.double() for t in inputs], weights.double())
    errors = {}
    for name, forward in (("fast", lambda m, *i: m(*i)), ("reference", reference_pointnet2)):
        out, grads, bufs = _run(copy.deepcopy(start).float(), forward, inputs, weights)
        cast = (out.double(), {k: v.double() for k, v in grads.items()}, {k: v.double() for k, v in bufs.items()})
        errors[name] = _compare(cast, truth, rtol=1.0)
    for part, floor in (("output", 1e-6), ("gradient", 1e-4), ("buffers", 1e-6)):
        assert errors["fast"][part] <= 10 * errors["reference"][part] + floor, (part, errors)
    assert errors["fast"]["output"] < 1e-4 and errors["fast"]["buffers"] < 1e-4, errors


class _OtherNorm(oe._PointBatchNorm):
    """A BatchNorm of another class (as torchrun's global-batch switch makes them)."""


@pytest.mark.parametrize("train", [True, False])
def test_pointnet2_with_other_batchnorms_runs_them_as_modules(train, monkeypatch):
    """With BatchNorms of another class the MLPs run as modules (their own forward is used), and
    still compute what the fused form does."""
    g = torch.Generator().manual_seed(10)
    fast, plain = _twins(lambda: oe.PointNet2(out_dim=24), torch.float64, g)
    for m in plain.modules():
        if isinstance(m, oe._PointBatchNorm):
            m.__class__ = _OtherNorm
    fast.train(train), plain.train(train)
    fused = []
    monkeypatch.setattr(oe._PointMLPMax, "apply", lambda *a, _f=oe._PointMLPMax.apply: fused.append(1) or _f(*a))
    inputs = [t.double() for t in _objects(5, 32, g, distinct=None)]
    weights = torch.randn(5, 24, generator=g, dtype=torch.float64)
    got_plain = _run(plain, lambda m, *i: m(*i), inputs, weights)
    assert not fused  # no fused call with other BatchNorms
    _compare(_run(fast, lambda m, *i: m(*i), inputs, weights), got_plain, F64_RTOL)
    assert fused


def test_pointnet2_second_backward_is_refused():
    net = oe.PointNet2(out_dim=8).train()
    xyz, rgb, center = _objects(2, 16, torch.Generator().manual_seed(3))
    loss = net(xyz, rgb, center).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


def _workspaces(net):
    return [layer.workspace for layer in [*net.set_abstractions, net.global_abstraction]]


def test_pointnet2_workspace_reused_across_steps_of_other_sizes():
    """The row buffers kept from one step to the next (grown, then reused by smaller batches with
    their old contents) change no value: every step matches the reference, weights stepped."""
    g = torch.Generator().manual_seed(11)
    fast, slow = _twins(lambda: oe.PointNet2(out_dim=24), torch.float64, g)
    fast.train(), slow.train()
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.05)
    opt_slow = torch.optim.SGD(slow.parameters(), lr=0.05)
    pointers = None
    for n, points, distinct in ((6, 48, None), (3, 32, 4), (8, 64, None), (2, 16, None)):
        inputs = [t.double() for t in _objects(n, points, g, distinct)]
        weights = torch.randn(n, 24, generator=g, dtype=torch.float64)
        _compare(_run(fast, lambda m, *i: m(*i), inputs, weights),
                 _run(slow, reference_pointnet2, inputs, weights), F64_RTOL)
        opt_fast.step(), opt_slow.step()
        held = {id(ws): {k: b.data_ptr() for k, b in ws._buffers.items()} for ws in _workspaces(fast)}
        assert all(ws.nbytes() > 0 and not ws._held for ws in _workspaces(fast))
        if (n, points) == (2, 16):  # smaller than the step before: the same buffers
            assert held == pointers
        pointers = held


def test_pointnet2_second_forward_before_backward_gets_fresh_rows():
    """Two graphs alive at once (the second forward finds the buffers held): both gradients right."""
    g = torch.Generator().manual_seed(12)
    fast, slow = _twins(lambda: oe.PointNet2(out_dim=24), torch.float64, g)
    fast.train(), slow.train()
    first = [t.double() for t in _objects(5, 32, g)]
    second = [t.double() for t in _objects(4, 40, g)]
    w1, w2 = (torch.randn(k, 24, generator=g, dtype=torch.float64) for k in (5, 4))

    def both(m, forward):
        m.zero_grad(set_to_none=True)
        out1, out2 = forward(m, *first), forward(m, *second)
        ((out1 * w1).sum() + (out2 * w2).sum()).backward()
        return torch.cat([out1, out2]).detach(), {k: p.grad.clone() for k, p in m.named_parameters()}, \
            {k: b.clone() for k, b in m.named_buffers()}

    _compare(both(fast, lambda m, *i: m(*i)), both(slow, reference_pointnet2), F64_RTOL)
    assert not any(ws._held for ws in _workspaces(fast))


def test_pointnet2_workspace_released_without_backward():
    """No backward coming (no_grad, eval without gradients) or a graph dropped unused: the buffers
    are free again for the next call."""
    net = oe.PointNet2(out_dim=8).train()
    xyz, rgb, center = _objects(3, 16, torch.Generator().manual_seed(13))
    with torch.no_grad():
        net(xyz, rgb, center)
    assert not any(ws._held for ws in _workspaces(net))
    out = net(xyz, rgb, center)
    assert all(ws._held for ws in _workspaces(net))
    del out  # the graph goes, its leases with it
    assert not any(ws._held for ws in _workspaces(net))


@pytest.mark.parametrize("batch_stats", [True, False])
def test_batch_norm_backward_in_place_rounds_no_worse_than_torchs(batch_stats):
    """float32 against float64 truth, rows with an offset mean (the cancellation-prone case)."""
    g = torch.Generator().manual_seed(15)
    E, C = 4000, 16
    x = 2.0 * torch.randn(E, C, generator=g) + 3.0
    grad = torch.randn(E, C, generator=g)
    norm = oe._PointBatchNorm(C)
    _randomise_norms(norm, g)
    with torch.no_grad():
        _, mean, invstd = torch.native_batch_norm(x, norm.weight, norm.bias, None, None, True, 0.0, norm.eps)
        _, mean64, invstd64 = torch.native_batch_norm(x.double(), norm.weight.double(), None, None, None,
                                                      True, 0.0, norm.eps)
        truth = torch.ops.aten.native_batch_norm_backward(
            grad.double(), x.double(), norm.weight.double(), norm.running_mean.double(),
            norm.running_var.double(), mean64, invstd64, batch_stats, norm.eps, [True, True, True])
        torchs = torch.ops.aten.native_batch_norm_backward(
            grad, x, norm.weight, norm.running_mean, norm.running_var, mean, invstd, batch_stats, norm.eps,
            [True, True, True])
        mine = oe._batch_norm_backward_in_place(grad, x.clone(), torch.empty_like(x), norm, mean, invstd,
                                               batch_stats)
    for got, ref, want in zip(mine, torchs, truth):
        assert _rel(got.double(), want) <= 2 * _rel(ref.double(), want) + 1e-7


def test_pointnet2_copy_gets_its_own_empty_workspace():
    net = oe.PointNet2(out_dim=8).train()
    net(*_objects(2, 16, torch.Generator().manual_seed(14))).sum().backward()
    twin = copy.deepcopy(net)
    for mine, theirs in zip(_workspaces(net), _workspaces(twin)):
        assert mine.nbytes() > 0 and theirs.nbytes() == 0 and mine is not theirs


@pytest.mark.parametrize("train", [True, False])
def test_beose_matches_the_bezier_points_form(train):
    g = torch.Generator().manual_seed(4)
    B, O, D = 5, 7, 16
    make = lambda: BEOSE(embed_dim=D, rel_dim=8, num_layers=3, num_samples=4, dropout=0.0)  # noqa: E731
    fast, slow = _twins(make, torch.float64, g)
    fast.train(train), slow.train(train)
    x = torch.randn(B, O, D, generator=g, dtype=torch.float64)
    center = torch.rand(B, O, 3, generator=g, dtype=torch.float64)
    mask = torch.arange(O).unsqueeze(0) < torch.tensor([[1], [2], [7], [4], [6]])
    w_obj = torch.randn(B, O, D, generator=g, dtype=torch.float64)
    w_rel = torch.randn(B, O, D, generator=g, dtype=torch.float64)

    def forward(fn):
        return lambda m, x_, c_, m_: torch.cat([t * w for t, w in zip(fn(m, x_, c_, m_), (w_obj, w_rel))], -1)

    ones = torch.ones(B, O, 2 * D, dtype=torch.float64)
    _compare(_run(fast, forward(lambda m, *i: m(*i)), (x, center, mask), ones),
             _run(slow, forward(reference_beose), (x, center, mask), ones), F64_RTOL)


def test_pointnet_max_before_relu_matches():
    g = torch.Generator().manual_seed(5)
    fast, slow = _twins(lambda: oe.PointNet(out_dim=16), torch.float64, g)
    inputs = [t.double() for t in _objects(4, 12, g, distinct=3)]
    weights = torch.randn(4, 16, generator=g, dtype=torch.float64)
    _compare(_run(fast, lambda m, *i: m(*i), inputs, weights), _run(slow, reference_pointnet, inputs, weights),
             F64_RTOL)


def test_no_grad_chunks_give_the_values_of_one_pass(monkeypatch):
    """Without autograd BEOSE runs cells, and the 'mlp' PointNet objects, in chunks (cache-sized
    tensors): the values are those of the reference on the whole batch."""
    g = torch.Generator().manual_seed(9)
    B, O, D = 5, 7, 16
    monkeypatch.setattr(beose_module, "NO_GRAD_CHUNK_PAIRS", 2 * O * O)  # 2 cells per chunk
    monkeypatch.setattr(oe, "NO_GRAD_CHUNK_OBJECTS", 3)
    calls = {"cells": 0, "points": 0}
    for cls, name, key in ((BEOSE, "_cells", "cells"), (oe.PointNet, "_points_max", "points")):
        original = getattr(cls, name)

        def counted(self, *a, _original=original, _key=key):
            calls[_key] += 1
            return _original(self, *a)

        monkeypatch.setattr(cls, name, counted)
    beose = BEOSE(embed_dim=D, rel_dim=8, num_layers=2, num_samples=4, dropout=0.0).double().eval()
    x = torch.randn(B, O, D, generator=g, dtype=torch.float64)
    center = torch.rand(B, O, 3, generator=g, dtype=torch.float64)
    mask = torch.arange(O).unsqueeze(0) < torch.tensor([[1], [2], [7], [4], [6]])
    pointnet = oe.PointNet(out_dim=16).double().eval()
    xyz, rgb, centre = (t.double() for t in _objects(10, 12, g, distinct=5))
    with torch.no_grad():
        got = beose(x, center, mask)
        want = reference_beose(beose, x, center, mask)
        got_points = pointnet(xyz.view(2, 5, 12, 3), rgb.view(2, 5, 12, 3), centre.view(2, 5, 3))
        want_points = reference_pointnet(pointnet, xyz, rgb, centre).view(2, 5, 16)
    assert calls == {"cells": 3, "points": 4}  # ceil(5 / 2) chunks of cells, ceil(10 / 3) of objects
    for a, b in zip(got, want):
        assert _rel(a, b) <= F64_RTOL
    assert _rel(got_points, want_points) <= F64_RTOL


def test_coarse_cells_embedding_with_pointnet2_matches_references(monkeypatch):
    """The whole coarse cell side (PointNet++ in an ObjectEncoder, BEOSE, FAE) against the
    references swapped in: same embeddings and parameter gradients."""
    from spatialoc_ros.models.builder import build_coarse_model
    from spatialoc_ros.models.config import CoarseConfig
    from spatialoc_ros.models.random_inputs import random_cell_batch

    torch.manual_seed(6)
    cfg = CoarseConfig(embed_dim=16, num_points=12, max_objects=6, pointnet_dim=8, pointnet_arch="pointnet2",
                       num_hidden_layers=2, num_heads=2, beose_dim=8, dropout=0.0)
    fast = build_coarse_model(cfg, cfg.text_dim).double().train()
    _randomise_norms(fast.object_encoder, torch.Generator().manual_seed(7))
    slow = build_coarse_model(cfg, cfg.text_dim).double().train()
    slow.load_state_dict(fast.state_dict(), strict=True)
    cells = random_cell_batch(4, max_objects=6, num_points=12, generator=torch.Generator().manual_seed(8))
    cells = type(cells)(**{k: (v.double() if v.is_floating_point() else v) for k, v in vars(cells).items()})

    def embed(model, cells_):
        e = model.encode_cells(cells_)
        return torch.cat([e.global_.flatten(), e.objects.flatten(), e.relations.flatten()])

    size = 4 * 16 + 2 * 4 * 6 * 16  # global (B, D), objects and relations (B, O, D)
    weights = torch.randn(size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fast_run = _run(fast, embed, (cells,), weights)
    monkeypatch.setattr(oe.PointNet2, "forward", reference_pointnet2)
    monkeypatch.setattr(beose_module.BEOSE, "forward", reference_beose)
    _compare(fast_run, _run(slow, embed, (cells,), weights), F64_RTOL)
