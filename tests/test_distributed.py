"""Distributed training on CPU (gloo): torchrun runs of the real CLI against one-process runs, the sharding of the
loader, and the engine's DDP behaviour (no_sync during accumulation, agreed skips of non-finite steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import MODEL, RUN

from mae.data import build_loader, set_epoch
from mae.train.checkpoint import safe_load

TINY = [*MODEL, *[o for o in RUN if not o.startswith(("data.num_workers", "batch_size"))], "epochs=2", "save_every=1",
        "visualize=false"]
TIMEOUT = 300  # seconds; a deadlocked collective fails the test instead of hanging it


def _env() -> dict[str, str]:
    # one thread per process: 2 ranks on a small shared CPU run far faster (and steadier) without oversubscription
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _step_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "epoch_loss" not in r]


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process_run_with_the_same_global_batch(tmp_path):
    """`torchrun --nproc_per_node 2 -m mae pretrain` (batch 16 per rank, 2 accumulation steps, a loader worker per
    rank) logs the same per-update losses (1e-5) and ends with the same weights as one process with batch 32: the
    shards, per-sample crops and masks, the no_sync accumulation, the gradient all-reduce and the all-reduced loss all
    line up. Only rank 0 writes (one metrics line per update, one summary on stdout).

    Every weight agrees to 1e-5 except the attention key biases: their gradient is analytically zero (softmax ignores
    a shift common to all keys), so AdamW turns float rounding noise into updates of up to lr x 0.1 per step; those are
    only required to agree to 1e-4.

    AdamW all but cancels a gradient scaled by a constant, so gradients summed over the 2 ranks instead of averaged
    move the losses by 2e-7 and the weights by 6e-7 only; AdamW's first moment (a running mean of the gradients)
    doubles, though: every parameter's exp_avg must agree to 1e-3 of its largest entry (measured: 3e-7)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*TINY, "accum_iter=2"]
    single = subprocess.Popen([sys.executable, "-m", "mae", "pretrain", *common, "batch_size=32", "data.num_workers=0",
                               f"output_dir={one}"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    double = subprocess.Popen(_torchrun("-m", "mae", "pretrain", *common, "batch_size=16", "data.num_workers=1",
                                        f"output_dir={two}"), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    _finish(single)
    out = _finish(double)

    assert out.count("updates: 8") == 1  # 2 epochs x 256 / (32 x 2); printed by rank 0 only
    a, b = _step_losses(one), _step_losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))  # one line per update: rank 0 alone writes
    loss_diff = max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))
    assert loss_diff < 1e-5, loss_diff
    wa, wb = safe_load(one / "checkpoint-last.pth")["model"], safe_load(two / "checkpoint-last.pth")["model"]
    assert wa.keys() == wb.keys()
    worst, worst_key_bias = 0.0, 0.0
    for k in wa:
        diff = (wa[k] - wb[k]).abs()
        if k.endswith("attn.qkv.bias"):
            dim = diff.numel() // 3
            worst_key_bias = max(worst_key_bias, diff[dim:2 * dim].max().item())
            diff = torch.cat([diff[:dim], diff[2 * dim:]])
        worst = max(worst, diff.max().item())
    print(f"1 vs 2 processes: max loss diff {loss_diff:.2e}, max weight diff {worst:.2e} "
          f"(key biases {worst_key_bias:.2e})")
    assert worst < 1e-5 and worst_key_bias < 1e-4, (worst, worst_key_bias)
    assert not torch.equal(wa["blocks.0.attn.proj.weight"], safe_load(one / "checkpoint-0000.pth")["model"][
        "blocks.0.attn.proj.weight"])  # the weights did move between the two compared points
    ma, mb = _first_moments(one / "checkpoint-last.pth"), _first_moments(two / "checkpoint-last.pth")
    assert ma.keys() == mb.keys() == wa.keys() - {"pos_embed", "decoder_pos_embed"}  # every trained parameter
    relative = {}
    for k in ma:
        a, b = ma[k], mb[k]
        if k.endswith("attn.qkv.bias"):  # the key biases' gradient is rounding noise (above): so is its mean
            dim = a.numel() // 3
            a, b = torch.cat([a[:dim], a[2 * dim:]]), torch.cat([b[:dim], b[2 * dim:]])
        relative[k] = ((a - b).abs().max() / a.abs().max()).item()
    print(f"1 vs 2 processes: AdamW exp_avg max relative diff {max(relative.values()):.2e}")
    assert max(relative.values()) < 1e-3, sorted(relative.items(), key=lambda kv: -kv[1])[:5]


def _first_moments(checkpoint: Path) -> dict[str, torch.Tensor]:
    """AdamW's exp_avg of every trained parameter of a single-file training checkpoint, by parameter name."""
    optimizer = safe_load(checkpoint)["engine"]["optimizer"]
    named = [(n, i) for g in optimizer["param_groups"] for n, i in zip(g["param_names"], g["params"], strict=True)]
    return {n: optimizer["state"][i]["exp_avg"] for n, i in named}


class _IndexAndDraw(torch.utils.data.Dataset):
    """Item = (index, a draw from the per-sample RNG): shows both the order and the augmentation seed."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, torch.rand(()).item()


def _batches(loader) -> list[list[tuple[int, float]]]:
    return [list(zip(idx.tolist(), draw.tolist(), strict=True)) for idx, draw in loader]


def test_rank_batches_partition_the_single_process_batches_of_the_same_global_size(monkeypatch):
    """With distributed=True, batch k of rank 0 and rank 1 (4 each) together hold exactly the samples, with the same
    per-sample random draws, of batch k of a one-process loader with batch 8; the shards are disjoint, and set_epoch
    reshuffles them every epoch."""
    single = build_loader(_IndexAndDraw(), batch_size=8, seed=5, drop_last=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        ranks.append(build_loader(_IndexAndDraw(), batch_size=4, seed=5, drop_last=True, distributed=True))
    orders = []
    for epoch in (0, 1):
        for loader in (single, *ranks):
            set_epoch(loader, epoch)
        whole, shard0, shard1 = _batches(single), _batches(ranks[0]), _batches(ranks[1])
        assert len(whole) == len(shard0) == len(shard1) == 5
        for k in range(5):
            assert sorted(shard0[k] + shard1[k]) == sorted(whole[k])
            assert not {i for i, _ in shard0[k]} & {i for i, _ in shard1[k]}
        orders.append([i for batch in shard0 for i, _ in batch])
    assert orders[0] != orders[1]


_ENGINE_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel
    from mae.errors import TrainingError
    from mae.train.distributed import all_gather_objects, cleanup, init_distributed
    from mae.train.engine import Engine, LRSchedule

    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    initial = [p.detach().clone() for p in model.parameters()]
    ddp = DistributedDataParallel(model)
    allreduces = []

    def counting_hook(state, bucket):
        allreduces.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    class Records:
        rows = []
        def log(self, row):
            self.rows.append(row)

    ddp.register_comm_hook(None, counting_hook)
    engine = Engine(ddp, torch.optim.SGD(model.parameters(), lr=1.0), LRSchedule(0.1, 100, 0, 0.1), accum_iter=2,
                    max_nonfinite=2, show_progress=False, world_size=info.world_size, logger=Records(), log_every=1)
    g = torch.Generator().manual_seed(10 + info.rank)  # each rank its own data
    batches = [(torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(4)]
    where = {"epoch": 0, "i": 0}
    nan_at = set()  # (epoch, micro-batch) where this rank's loss is NaN
    seen = []  # this rank's finite losses of epoch 0

    def loss_fn(m, batch):
        loss = ((m(batch[0]) - batch[1]) ** 2).mean()
        key = (where["epoch"], where["i"])
        where["i"] += 1
        if key in nan_at:
            return loss * float("nan")
        if key[0] == 0:
            seen.append(loss.item())
        return loss

    def epoch_run(e):
        where.update(epoch=e, i=0)
        return engine.train_epoch(batches, e, loss_fn)

    result = {}
    stats = epoch_run(0)  # 4 micro-batches, accum 2: 2 updates
    result["allreduces"] = len(allreduces)
    result["epoch_loss"] = stats.loss
    result["step_losses"] = [row["loss"] for row in Records.rows]
    result["seen"] = seen
    # the two SGD steps of epoch 0 by hand, on one process: each takes the mean gradient of its window's 4 losses
    # (2 micro-batches x 2 ranks); gradients summed over the ranks would make each step twice as long
    reference = nn.Linear(4, 1)
    with torch.no_grad():
        for p, p0 in zip(reference.parameters(), initial):
            p.copy_(p0)
    both = []
    for r in range(info.world_size):
        gr = torch.Generator().manual_seed(10 + r)
        both.append([(torch.randn(3, 4, generator=gr), torch.randn(3, 1, generator=gr)) for _ in range(4)])
    for w in range(2):
        window = [b for rank_batches in both for b in rank_batches[2 * w:2 * w + 2]]
        mean_loss = sum(((reference(x) - y) ** 2).mean() for x, y in window) / len(window)
        grads = torch.autograd.grad(mean_loss, list(reference.parameters()))
        with torch.no_grad():
            for p, grad in zip(reference.parameters(), grads):
                p -= engine.schedule(w) * grad
    result["sgd_step_error"] = max((a - b).abs().max().item() for a, b in zip(model.parameters(),
                                                                               reference.parameters()))
    result["sgd_step_size"] = max((a - b).abs().max().item() for a, b in zip(reference.parameters(), initial))
    if info.rank == 1:
        nan_at = {(1, 1)}  # NaN on rank 1 only, on the micro-batch that ends the first window (the synced one)
    epoch_run(1)
    result["skipped"] = engine.nonfinite_total
    result["step"] = engine.step
    result["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
    if info.rank == 0:
        nan_at = {(2, 1), (2, 3)}  # two windows in a row on rank 0 only: stop
    before_stop = [p.detach().clone() for p in model.parameters()]
    try:
        epoch_run(2)
        result["stopped"] = None
    except TrainingError as e:
        result["stopped"] = str(e)
    result["unchanged_at_stop"] = all(torch.equal(a, b) for a, b in zip(before_stop, model.parameters()))
    all_results = all_gather_objects(result)
    if info.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(all_results, f)
    cleanup()
''')


@pytest.mark.slow
def test_engine_under_ddp_syncs_once_per_update_and_skips_non_finite_steps_on_every_rank(tmp_path):
    """Two gloo processes through torchrun running `Engine` on a DDP model with accum_iter=2:
    - gradients are all-reduced once per update, not per micro-batch (no_sync inside the accumulation window);
    - each SGD update is the step of the mean gradient over the window's micro-batches of both ranks (a hand-made
      one-process reference, to 1e-6; gradients summed over the ranks would double it);
    - the logged per-update losses and the epoch loss are the same on both ranks: means over both ranks' losses;
    - a NaN loss on rank 1 only, on the synced micro-batch, skips that update on both ranks (no deadlock, replicas
      stay identical, counted);
    - max_nonfinite=2 NaN windows in a row on rank 0 only stop both ranks with TrainingError, weights untouched."""
    script = tmp_path / "engine_ddp.py"
    script.write_text(_ENGINE_SCRIPT)
    out = tmp_path / "result.json"
    proc = subprocess.run(_torchrun(str(script), str(out)), check=False, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    # Under pytest, gloo sometimes aborts a process at exit, after its process group is destroyed and the results
    # are written ("terminate called without an active exception"); the behaviour under test is the JSON below.
    teardown_abort = "terminate called without an active exception" in proc.stderr and out.exists()
    assert proc.returncode == 0 or teardown_abort, proc.stdout[-2000:] + proc.stderr[-3000:]
    r0, r1 = json.loads(out.read_text())
    assert r0["allreduces"] == r1["allreduces"] == 2  # 4 micro-batches would mean no_sync was not used
    assert r0["epoch_loss"] == r1["epoch_loss"] == pytest.approx(sum(r0["seen"] + r1["seen"]) / 8, rel=1e-12)
    windows = [(r0["seen"][2 * w] + r0["seen"][2 * w + 1] + r1["seen"][2 * w] + r1["seen"][2 * w + 1]) / 4
               for w in range(2)]
    assert r0["step_losses"] == r1["step_losses"] == pytest.approx(windows, rel=1e-12)
    assert r0["seen"] != r1["seen"]  # the ranks really had different losses to average
    for r in (r0, r1):
        assert r["sgd_step_size"] > 1e-2 and r["sgd_step_error"] < 1e-6, (r["sgd_step_size"], r["sgd_step_error"])
    assert r0["skipped"] == r1["skipped"] == 1 and r0["step"] == r1["step"] == 4  # windows: 2 + (1 skipped, 1 done)
    assert r0["weights"] == r1["weights"]
    for r in (r0, r1):
        assert r["stopped"] is not None and "non-finite for 2 consecutive updates" in r["stopped"]
        assert r["unchanged_at_stop"]


@pytest.mark.slow
def test_two_process_run_killed_after_a_mid_epoch_step_checkpoint_resumes_bit_identically(tmp_path):
    """2 gloo processes with save_every_steps=2: the run is SIGKILLed (the whole torchrun group) once run.json says
    a checkpoint stands inside an epoch; `torchrun ... --resume auto` on 2 processes then ends with weights
    bit-identical (torch.equal) to the same 2-process run left alone, and metrics.jsonl has every update once."""
    import signal
    import time

    common = [*TINY, "epochs=3", "batch_size=8", "data.num_workers=0", "save_every_steps=2", "log_every=1"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    alone = subprocess.Popen(_torchrun("-m", "mae", "pretrain", *common, f"output_dir={full}"), env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_torchrun("-m", "mae", "pretrain", *common, f"output_dir={killed}"), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def mid_epoch_checkpoint() -> bool:
        try:
            status = json.loads((killed / "run.json").read_text())
        except (OSError, ValueError):
            return False
        return status.get("checkpoint") == "checkpoint-last.pth" and status.get("position", [0, 0])[0] >= 1

    deadline = time.monotonic() + TIMEOUT
    while not mid_epoch_checkpoint() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    _finish(alone)
    resumed = subprocess.run(_torchrun("-m", "mae", "pretrain", "--output-dir", str(killed), "--resume", "auto"),
                             env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    a, b = safe_load(full / "checkpoint-last.pth")["model"], safe_load(killed / "checkpoint-last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [s for s, _ in _step_losses(killed)]
    assert steps == sorted(set(steps)) == list(range(1, steps[-1] + 1))
