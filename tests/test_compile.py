"""torch.compile(fullgraph=True) around training steps that call anisodiff: no graph break, no
recompile per step, no stale constants."""
import pytest
import torch

import anisodiff as ad

from conftest import random_axes, requires_compiled

pytestmark = requires_compiled


@pytest.fixture
def spec():
    return ad.NoiseSpec(ad.Squeeze(random_axes(3, 1), -0.4), ad.PowerLaw(-0.04))


def _compile(fn, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager", **kw)


def test_seed_and_offset_change_every_step_without_recompiling(spec, schedule):
    def step(x0, t, seed, offset):
        return ad.add_noise(x0, t, spec, schedule, seed=seed, offset=offset)[1]

    compiled = _compile(step)
    x0, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    with torch._dynamo.config.patch(recompile_limit=2):  # > 2 compiles would raise under fullgraph
        for i in range(6):
            out = compiled(x0, t, 100 + i, 7 * i)
            assert torch.equal(out, step(x0, t, 100 + i, 7 * i))


def test_default_generator_seed_stays_in_graph(spec, schedule):
    def step(x0, t):
        return ad.add_noise(x0, t, spec, schedule)[1]

    compiled = _compile(step)
    x0, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    torch.manual_seed(0)
    a, b = compiled(x0, t), compiled(x0, t)
    assert not torch.equal(a, b)  # the generator advanced inside the graph
    torch.manual_seed(0)
    assert torch.equal(compiled(x0, t), a)


def test_several_resolutions_with_static_shapes(spec, schedule):
    """The spectral tables depend on H x W, so each resolution is its own graph (dynamic=False;
    symbolic plane sizes are not supported)."""
    def step(x0, t):
        return ad.add_noise(x0, t, spec, schedule, seed=3)[0]

    compiled = _compile(step, dynamic=False)
    for hw in [(8, 8), (16, 12), (8, 8)]:
        x0 = torch.randn(2, 3, *hw)
        t = torch.tensor([1, 999])
        assert torch.equal(compiled(x0, t), step(x0, t))


def test_diffusers_style_scheduler_object(spec):
    class Scheduler:  # the two attributes anisodiff reads from a diffusers scheduler
        def __init__(self):
            self.betas = torch.linspace(1e-4, 0.02, 1000)
            self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)

    sched = Scheduler()

    def step(x0, t):
        return ad.add_noise(x0, t, spec, sched, seed=11)

    compiled = _compile(step)
    x0, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    for got, want in zip(compiled(x0, t), step(x0, t)):
        assert torch.equal(got, want)


def test_training_step_with_backward(spec, schedule):
    """Loss compiled with fullgraph, backward through it (incl. the add_noise autograd to x0)."""
    model = torch.nn.Conv2d(3, 3, 3, padding=1)

    def loss_fn(x0, t, seed):
        x_t, v = ad.add_noise(x0, t, spec, schedule, seed=seed, target="v")
        return torch.nn.functional.mse_loss(model(x_t), v)

    compiled = _compile(loss_fn)
    x0, t = torch.randn(4, 3, 8, 8, requires_grad=True), torch.tensor([1, 2, 3, 999])
    grads = []
    for fn in (compiled, loss_fn):
        model.zero_grad()
        x0.grad = None
        loss = fn(x0, t, 5)
        loss.backward()
        grads.append((loss.detach(), model.weight.grad.clone(), x0.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
