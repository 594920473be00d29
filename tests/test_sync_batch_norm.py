"""normlab.nn.SyncBatchNorm: two gloo ranks on CPU against one BatchNorm on the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import normlab.nn as nln
from normlab.nn import SyncBatchNorm, convert_sync_batchnorm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sync_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _launch(tmp_path, mode, world=2, timeout=120):
    init = tmp_path / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(HERE / "sync_worker.py"), str(r), str(world),
                               str(init), str(tmp_path), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank did not finish within {timeout} s (mode {mode})")
        outs.append((p.returncode, out, err))
    return outs


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Per world size (2 and 3 ranks), the saved results of every rank."""
    res = {}
    for world in (2, 3):
        tmp = tmp_path_factory.mktemp(f"sync{world}")
        outs = _launch(tmp, "cases", world=world)
        for rc, out, err in outs:
            assert rc == 0, err[-3000:]
        res[world] = [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
        res[world, "ddp"] = [torch.load(tmp / f"ddp_rank{r}.pt") for r in range(world)]
    return res


def _expected(case_index):
    name, shape, sizes, cl, momentum, affine, dtype = sync_worker.CASES[case_index]
    dtype = getattr(torch, dtype)
    x, grads = sync_worker.global_data(shape, case_index)
    x, grads = x.to(dtype), grads.to(dtype)
    bn_cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
              5: torch.nn.BatchNorm3d}[len(shape)]
    m = bn_cls(shape[1], momentum=momentum, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            m.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    out = {}
    for step in range(2):
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        (y * grads[step]).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), xr.grad
        if affine:
            out[f"dw{step}"], out[f"db{step}"] = m.weight.grad.clone(), m.bias.grad.clone()
            m.weight.grad = m.bias.grad = None
    out["running_mean"], out["running_var"] = m.running_mean, m.running_var
    m.eval()
    out["y_eval"] = m(x).detach()
    return out, sizes, cl, affine, dtype


@pytest.mark.parametrize("i", range(len(sync_worker.CASES)), ids=[c[0] for c in sync_worker.CASES])
def test_ranks_equal_one_batch_norm_on_the_global_batch(rank_results, i):
    name = sync_worker.CASES[i][0]
    exp, sizes, cl, affine, dtype = _expected(i)
    ranks = [r[name] for r in rank_results[len(sizes)]]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for step in range(2):
        for key in (f"y{step}", f"dx{step}"):
            got = torch.cat([r[key] for r in ranks])
            torch.testing.assert_close(got, exp[key], **tol, msg=f"{name} {key}")
        if affine:   # local parameter gradients; DDP sums/averages them across ranks
            for key in (f"dw{step}", f"db{step}"):
                got = sum(r[key] for r in ranks)
                torch.testing.assert_close(got, exp[key], **tol, msg=f"{name} {key}")
        if cl:
            assert all(r[f"cl{step}"] for r, n in zip(ranks, sizes) if n), "channels-last lost"
        # exactly one collective in the forward and one in the backward, on every rank
        assert all(r[f"collectives{step}"] == (1, 1) for r in ranks), [r[f"collectives{step}"] for r in ranks]
    for r in ranks:   # identical running statistics on every rank, equal to the global BN's
        torch.testing.assert_close(r["running_mean"], exp["running_mean"], **tol)
        torch.testing.assert_close(r["running_var"], exp["running_var"], **tol)
        assert r["num_batches_tracked"] == 2
    torch.testing.assert_close(torch.cat([r["y_eval"] for r in ranks]), exp["y_eval"], **tol)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training_steps_match_single_process_training(rank_results, world):
    sizes = (5, 1, 3) if world == 3 else (5, 4)
    x, y = sync_worker.ddp_data(sum(sizes))
    model = sync_worker.ddp_model(torch.float64, torch.nn.BatchNorm1d)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
    expected = model.state_dict()
    for r, got in enumerate(rank_results[world, "ddp"]):
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-10, msg=f"rank {r} {k}")


def test_a_dead_peer_gives_a_clear_error_not_a_hang(tmp_path):
    outs = _launch(tmp_path, "dead-peer", timeout=90)
    rc0, out0, err0 = outs[0]
    assert rc0 == 3, (out0, err0[-2000:])
    assert "SyncBatchNorm: the all_gather of the batch statistics over 2 ranks did not complete" in out0


def test_without_a_process_group_it_is_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4)
    ours, ref = SyncBatchNorm(3), torch.nn.BatchNorm1d(3)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_convert_replaces_every_batch_norm_and_keeps_state():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Conv1d(4, 2, 1), nln.BatchNorm1d(2)))
    with torch.no_grad():
        net[1].weight.uniform_(); net[1].running_mean.uniform_()
    net[1].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    out = convert_sync_batchnorm(net)
    assert isinstance(out[1], SyncBatchNorm) and isinstance(out[3][1], SyncBatchNorm)
    assert not out[1].training and not out[1].weight.requires_grad
    for k, v in out.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert isinstance(SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm3d(2)), SyncBatchNorm)


def test_checkpoints_move_both_ways_with_torch():
    theirs = torch.nn.SyncBatchNorm(5)
    theirs.running_mean.uniform_()
    ours = SyncBatchNorm(5)
    ours.load_state_dict(theirs.state_dict())
    torch.nn.BatchNorm2d(5).load_state_dict(ours.state_dict())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="built for 3 channels"):
        SyncBatchNorm(3)(torch.randn(4, 2))


def test_ddp_example_trains(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(HERE.parent / "examples" / "ddp_syncbn.py"),
                           "--epochs", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SyncBatchNorm layers: 2" in proc.stdout
    acc = float(proc.stdout.strip().splitlines()[-1].split("test accuracy")[1].split()[0])
    assert acc > 0.5, proc.stdout   # 10 classes: chance is 0.1


def test_convert_keeps_a_missing_bias_missing():
    bn = torch.nn.BatchNorm2d(3, bias=False)
    out = convert_sync_batchnorm(bn)
    assert out.bias is None and out.weight is not None
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(out(x), bn(x))
