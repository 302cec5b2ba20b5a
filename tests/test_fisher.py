"""fisher_diagonal: each mode against a brute-force oracle, BackPACK as a second oracle, gloo with 2 ranks."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from forgetcore import datasets
from forgetcore.importance import fisher_diagonal, output_norm_loss

ROOT = Path(__file__).resolve().parents[1]


def close(got: dict, want: dict) -> None:
    """The issue's tolerance: rtol 1e-5 and atol 1e-6 * max F."""
    assert got.keys() == want.keys()
    top = max(float(v.abs().max()) for v in want.values())
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * top, msg=k)


def per_sample_loop(model, x, y, loss=None):
    """Exact empirical Fisher the slow way: one backward per sample (float64 accumulation)."""
    loss = loss or (lambda o, t: F.cross_entropy(o, t, reduction="none"))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in named}
    for i in range(len(x)):
        gs = torch.autograd.grad(loss(model(x[i:i + 1]), y[i:i + 1]).sum(), [p for _, p in named])
        for (n, _), g in zip(named, gs):
            acc[n] += g.double() ** 2
    return {n: (a / len(x)).float() for n, a in acc.items()}


def batch_official(model, loader):
    """What the official SSD calc_importance does: square of each batch-mean gradient, mean over batches."""
    named = [(n, p) for n, p in model.named_parameters()]
    imp = {n: torch.zeros_like(p) for n, p in named}
    for x, y in loader:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in named:
            imp[n].data += p.grad.data.clone().pow(2)
    for n in imp:
        imp[n] /= float(len(loader))
    model.zero_grad()
    return imp


def digits(n=200, seed=0):
    x, y = datasets.load("digits")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, 10)).eval()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).eval()


class SeqModel(nn.Module):
    """Linear layers over a sequence (per-sample gradient sums over positions) plus a shared layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 12)
        self.shared = nn.Linear(12, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x):
        h = torch.tanh(self.inp(x.flatten(1).view(-1, 8, 8)))  # (N, 8 positions, 8 features)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # called twice: generic path
        return self.out(h.mean(1))


@pytest.mark.parametrize("make", [mlp, cnn, SeqModel], ids=["mlp", "cnn", "seq"])
@pytest.mark.parametrize("batch_size,chunk_size", [(64, 32), (37, 5)])
def test_empirical_equals_per_sample_loop(make, batch_size, chunk_size):
    x, y = digits(150)
    model = make()
    got = fisher_diagonal(model, TensorDataset(x, y), mode="empirical", batch_size=batch_size, chunk_size=chunk_size)
    close(got, per_sample_loop(model, x, y))


class ConvZoo(nn.Module):
    """Every convolution case: stride, dilation, padding, no bias, Conv1d, a grouped one and a shared one
    (both generic path), and an in-place ReLU after a contracted convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 3, 3, stride=2, padding=(1, 2))
        self.c2 = nn.Conv2d(3, 4, (2, 3), dilation=(2, 1), bias=False)
        self.g = nn.Conv2d(4, 4, 1, groups=2)
        self.shared = nn.Conv2d(4, 4, 1)
        self.c1d = nn.Conv1d(4, 2, 2, stride=2, padding=1, dilation=2)
        self.out = nn.Linear(2 * 3, 10)

    def forward(self, x):
        h = torch.relu_(self.c1(x))
        h = torch.tanh(self.g(torch.tanh(self.c2(h))))
        h = self.shared(torch.tanh(self.shared(h)))  # called twice: per-sample gradients from torch.func
        h = torch.tanh(self.c1d(h.flatten(2)))
        return self.out(h.flatten(1))


@pytest.mark.parametrize("batch_size", [40, 13])
def test_conv_contraction_equals_per_sample_loop(batch_size, monkeypatch):
    import forgetcore.fisher as fisher

    x, y = digits(60)
    model = ConvZoo().eval()
    got = fisher_diagonal(model, TensorDataset(x, y), mode="empirical", batch_size=batch_size)
    want = per_sample_loop(model, x, y)
    close(got, want)
    monkeypatch.setattr(fisher, "UNFOLD_BUDGET", 300)  # chunks of a few samples
    close(fisher_diagonal(model, TensorDataset(x, y), mode="empirical", batch_size=batch_size), want)
    # which modules took the contraction path
    fast, classes = fisher._classify(model, list(model.named_parameters()), x[:2])
    assert fast == {model.c1, model.c2, model.c1d, model.out}
    assert classes == 10


def mnist_cnn(seed=0):
    """The issue's small MNIST CNN (conv 1-16-32 5x5, two pools, two linear layers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's own hooks
def test_backpack_sum_grad_squared_oracle_mnist_cnn():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import SumGradSquared

    x, y = datasets.load("mnist")
    x, y = x[:64], y[:64]
    model = mnist_cnn()
    got = fisher_diagonal(model, TensorDataset(x, y), mode="empirical", batch_size=32)
    bp_model = backpack.extend(mnist_cnn())
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(SumGradSquared()):
        lossf(bp_model(x), y).backward()
    close(got, {n: p.sum_grad_squared / len(x) for n, p in bp_model.named_parameters()})


def test_empirical_does_not_depend_on_batching_and_leaves_grads_alone():
    x, y = digits(120)
    model = mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    a = fisher_diagonal(model, TensorDataset(x, y), mode="empirical", batch_size=120)
    b = fisher_diagonal(model, DataLoader(TensorDataset(x, y), batch_size=7), mode="empirical")
    close(a, b)
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())


def test_frozen_parameters_are_left_out():
    x, y = digits(50)
    model = mlp()
    model[1].weight.requires_grad_(False)
    got = fisher_diagonal(model, TensorDataset(x, y), mode="empirical")
    assert "1.weight" not in got and "1.bias" in got
    close(got, per_sample_loop(model, x, y))


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_batch_mode_equals_official_loop(make):
    x, y = digits(150)
    model = make()
    got = fisher_diagonal(model, TensorDataset(x, y), mode="batch", batch_size=64)
    close(got, batch_official(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)))


def test_batch_mode_depends_on_batch_size_but_empirical_does_not():
    x, y = digits(128)
    model = mlp()
    b1 = fisher_diagonal(model, TensorDataset(x, y), mode="batch", batch_size=1)
    e = fisher_diagonal(model, TensorDataset(x, y), mode="empirical")
    close(b1, e)  # batches of one sample: the batch estimate is the empirical Fisher
    b64 = fisher_diagonal(model, TensorDataset(x, y), mode="batch", batch_size=64)
    assert float(sum(v.sum() for v in b64.values())) < 0.5 * float(sum(v.sum() for v in e.values()))


def test_label_free_abs_batch():
    x, y = digits(100)
    model = mlp()
    got = fisher_diagonal(model, TensorDataset(x, y), loss_fn=output_norm_loss, mode="batch", accumulate="abs",
                          batch_size=50)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for s in (0, 50):
        gs = torch.autograd.grad((model(x[s:s + 50]) ** 2).sum(1).mean(), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), gs):
            want[n] += g.abs() / 2
    close(got, want)


def true_fisher(model, x):
    """E_{y ~ p(y|x)} (grad log p(y|x))^2 by enumerating every class."""
    named = list(model.named_parameters())
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in named}
    for i in range(len(x)):
        logp = F.log_softmax(model(x[i:i + 1]), 1)[0]
        for k in range(logp.shape[0]):
            gs = torch.autograd.grad(-logp[k], [p for _, p in named], retain_graph=True)
            w = float(logp[k].detach().exp())
            for (n, _), g in zip(named, gs):
                acc[n] += w * g.double() ** 2
    return {n: a / len(x) for n, a in acc.items()}


def test_mc_is_seeded_and_unbiased():
    x, _ = digits(40)
    model = mlp()
    ds = TensorDataset(x.repeat(25, 1, 1, 1), torch.zeros(1000, dtype=torch.long))  # labels are resampled
    a = fisher_diagonal(model, ds, mode="mc", seed=3, batch_size=250)
    b = fisher_diagonal(model, ds, mode="mc", seed=3, batch_size=250)
    c = fisher_diagonal(model, ds, mode="mc", seed=4, batch_size=250)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    want = true_fisher(model, x)
    for k in want:  # 25 label draws per input: the total agrees within a few percent
        assert float(a[k].sum()) == pytest.approx(float(want[k].sum()), rel=0.1), k


def test_bad_input():
    x, y = digits(20)
    model = mlp()
    ds = TensorDataset(x, y)
    with pytest.raises(ValueError, match="^data: expected a non-empty dataset"):
        fisher_diagonal(model, TensorDataset(x[:0], y[:0]))
    with pytest.raises(ValueError, match="^data: expected a non-empty dataset, got no batches"):
        fisher_diagonal(model, [])
    with pytest.raises(ValueError, match="^mode: expected one of"):
        fisher_diagonal(model, ds, mode="exact")
    with pytest.raises(ValueError, match=r"^loss_fn: expected per-sample losses of shape \(20,\)"):
        fisher_diagonal(model, ds, loss_fn=F.cross_entropy, mode="empirical", batch_size=20)
    with pytest.raises(ValueError, match="^accumulate: 'abs' is defined for mode='batch'"):
        fisher_diagonal(model, ds, mode="empirical", accumulate="abs")
    with pytest.raises(ValueError, match="^batch_size: expected an int >= 1"):
        fisher_diagonal(model, ds, batch_size=0)
    with pytest.raises(TypeError, match="^model: expected a torch.nn.Module"):
        fisher_diagonal(lambda t: t, ds)
    with pytest.raises(TypeError, match="^data: expected batches of"):
        fisher_diagonal(model, [{"x": x}])
    with pytest.raises(ValueError, match="^distributed: True needs an initialised"):
        fisher_diagonal(model, ds, distributed=True)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's own hooks
def test_backpack_sum_grad_squared_oracle():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import SumGradSquared

    x, y = digits(100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    got = fisher_diagonal(model, TensorDataset(x, y), mode="empirical", batch_size=100)
    bp_model = backpack.extend(model)
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    with backpack.backpack(SumGradSquared()):
        lossf(bp_model(x), y).backward()
    want = {n: p.sum_grad_squared / len(x) for n, p in model.named_parameters()}
    close(got, want)


WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.utils.data import TensorDataset
    sys.path.insert(0, {python!r})
    from forgetcore.importance import fisher_diagonal
    torch.set_num_threads(1)
    rank, world, init, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    data = torch.load({data!r}, weights_only=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10))
    model.load_state_dict(data["state"])
    model.eval()
    x, y = data["x"][rank], data["y"][rank]
    res = {{m: fisher_diagonal(model, TensorDataset(x, y), mode=m, batch_size=16) for m in ("batch", "empirical")}}
    torch.save(res, out)
    dist.destroy_process_group()
""")


def test_distributed_gloo_two_ranks_equal_union(tmp_path):
    x, y = digits(90)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    # Unequal shards: rank 0 has 4 batches of 16, rank 1 a batch of 16 and a partial one of 10.
    xs, ys = [x[:64], x[64:]], [y[:64], y[64:]]
    data_file = tmp_path / "data.pt"
    torch.save({"x": xs, "y": ys, "state": model.state_dict()}, data_file)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(python=str(ROOT / "python"), data=str(data_file)))
    init = f"file://{tmp_path / 'rendezvous'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / f"out{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()
    res = [torch.load(tmp_path / f"out{r}.pt", weights_only=True) for r in range(2)]
    for mode in ("batch", "empirical"):
        for k in res[0][mode]:
            assert torch.equal(res[0][mode][k], res[1][mode][k]), (mode, k)  # every rank holds the same
    # empirical: the single-process value on the union of the ranks' data
    close(res[0]["empirical"], fisher_diagonal(model, TensorDataset(x, y), mode="empirical"))
    # batch: global batch b = union of the ranks' batches b (rank 1 runs out after 2)
    union = []
    for b in range(4):
        parts = [(xs[r][16 * b:16 * b + 16], ys[r][16 * b:16 * b + 16]) for r in range(2)]
        parts = [p for p in parts if len(p[0])]
        union.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    close(res[0]["batch"], fisher_diagonal(model, union, mode="batch"))
