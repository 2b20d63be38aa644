"""optkern.torch's CUDA step path with torch's device-resident state (run by bench/gpu_check.sh on a GPU machine).

capturable=True step tensors as device counters (bitwise equal to the CPU front end), GradScaler's device found_inf
skipping the step and the count, CUDA-graph capture and replay of a step over 200 tensors (static grads, and
torch's whole-network recipe where backward allocates the grads inside the capture), tables kept alive for a
graph while other steps churn the cache, and capture refused with host counts.
"""

import os

import pytest

import optkern

torch = pytest.importorskip("torch", reason="torch==2.13.0 is the reference here: pip install torch==2.13.0")
if not (torch.cuda.is_available() and optkern.cuda_available()):
    pytest.skip("no CUDA device (or optkern built without CUDA kernels) on this machine", allow_module_level=True)

import optkern.torch as okt  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True")


@pytest.fixture(autouse=True)
def _cpu_path_once(cpu_isa):
    """The CPU reference is exact on every CPU path: run the GPU checks under one fixture value only."""
    if cpu_isa != (os.environ.get("OPTKERN_CPU_ISA") or optkern.cpu_best_isa()):
        pytest.skip("GPU test: run once")


def _transformer_like(n=200, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(64, 64), (64,), (256, 64), (64, 256), (3,), (129,)]
    return [torch.randn(shapes[i % len(shapes)], device="cuda", generator=g) for i in range(n)]


def test_torch_capturable_adam_matches_cpu_and_keeps_steps_on_device():
    a = _transformer_like(12)
    b = [t.detach().cpu().clone() for t in a]
    a = [t.requires_grad_() for t in a]
    b = [t.requires_grad_() for t in b]
    oa = okt.Adam(a, lr=1e-2, capturable=True)
    ob = okt.Adam(b, lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        for p, q in zip(a, b):
            q.grad = torch.randn(q.shape, generator=g)
            p.grad = q.grad.to("cuda")
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert oa.state[p]["step"].device.type == "cuda"
        assert float(oa.state[p]["step"]) == 5.0
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=0, atol=0)


def test_torch_device_found_inf_skips_without_advancing():
    a = [t.requires_grad_() for t in _transformer_like(6)]
    b = [t.detach().clone().requires_grad_() for t in a]
    oa = okt.Adam(a, lr=1e-2, capturable=True)
    ob = torch.optim.Adam(b, lr=1e-2, capturable=True)
    g = torch.Generator(device="cuda").manual_seed(4)

    def grads():
        for p, q in zip(a, b):
            q.grad = torch.randn(q.shape, device="cuda", generator=g)
            p.grad = q.grad.clone()

    grads()
    oa.step()
    ob.step()  # step 1 on both (state created)
    before = [p.detach().clone() for p in a]
    for _ in range(3):  # as GradScaler hands a fused/capturable step its flag
        grads()
        oa.found_inf = torch.ones((), device="cuda")
        oa.step()
        del oa.found_inf
    for p, q in zip(a, before):
        assert torch.equal(p.detach(), q)
        assert float(oa.state[p]["step"]) == 1.0
    grads()
    oa.step()
    ob.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)


def test_graph_capture_and_replay_200_tensors():
    a = [t.requires_grad_() for t in _transformer_like(200, seed=1)]
    b = [t.detach().clone().requires_grad_() for t in a]
    gen = torch.Generator(device="cuda").manual_seed(5)
    static = [torch.randn(p.shape, device="cuda", generator=gen) for p in a]
    for p, q, s in zip(a, b, static):
        p.grad = s
        q.grad = s.clone()
    c = [t.detach().clone().requires_grad_() for t in a]
    for r, st in zip(c, static):
        r.grad = st.clone()
    oa = okt.Adam(a, lr=1e-2, weight_decay=0.01, capturable=True)
    ob = okt.Adam(b, lr=1e-2, weight_decay=0.01, capturable=True)
    oc = torch.optim.Adam(c, lr=1e-2, weight_decay=0.01, capturable=True)
    oc.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state created, the work plan uploaded
        oa.step()
    torch.cuda.current_stream().wait_stream(side)
    ob.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        oa.step()
    for i in range(10):
        for s, q, r in zip(static, b, c):  # new gradients written into the captured grads
            s.copy_(torch.randn(s.shape, device="cuda", generator=gen))
            q.grad.copy_(s)
            r.grad.copy_(s)
        graph.replay()
        ob.step()
        oc.step()
        if i == 4:  # other steps churn the table cache (more than its 16 entries): the graph's table stays
            for _ in range(20):
                x = [torch.randn(7, device="cuda").requires_grad_()]
                x[0].grad = torch.randn(7, device="cuda")
                okt.Adam(x, lr=1e-3, capturable=True).step()
    torch.cuda.synchronize()
    for p, q, r in zip(a, b, c):
        assert float(oa.state[p]["step"]) == 11.0
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(oa.state[p]["exp_avg_sq"], ob.state[q]["exp_avg_sq"])
        torch.testing.assert_close(p.detach(), r.detach(), rtol=2e-6, atol=1e-7)  # torch's own capturable Adam


def test_capture_with_host_count_is_refused():
    a = [t.requires_grad_() for t in _transformer_like(4)]
    for p in a:
        p.grad = torch.ones_like(p)
    opt = okt.Adam(a, lr=1e-2)  # host step counts: a graph would freeze them
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable"):
        with torch.cuda.graph(graph):
            opt.step()


def test_whole_network_capture_with_grads_allocated_in_the_graph():
    """torch's recipe: warm up on a side stream, zero_grad(set_to_none=True), then capture forward, backward (which
    allocates the grads inside the graph's pool, at new addresses) and the step; replays equal eager steps."""
    def model_and_opt(seed, cls):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8)).cuda()
        return net, cls(net.parameters(), lr=1e-2, capturable=True)

    net, opt = model_and_opt(0, okt.Adam)
    ref, ref_opt = model_and_opt(0, okt.Adam)
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(32, 64, device="cuda", generator=gen)
    y = torch.randn(32, 8, device="cuda", generator=gen)

    def train_step(m, o):
        o.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            train_step(net, opt)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        train_step(ref, ref_opt)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
    for _ in range(5):
        x.copy_(torch.randn(32, 64, device="cuda", generator=gen))
        graph.replay()
        train_step(ref, ref_opt)
    torch.cuda.synchronize()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert float(opt.state[p]["step"]) == 8.0
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
