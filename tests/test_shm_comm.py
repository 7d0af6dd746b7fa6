"""cpu_comm="shm": shared-memory all-reduce / all-gather / barrier give what gloo gives, on every rank,
regrow past their first capacity, refuse bad input, and fail (not hang) when a peer is gone."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ryzlab.config import ParallelConfig
from ryzlab.orchestrator import launch
from ryzlab.parallel.shm import FLAG_BYTES, ShmChannel, ShmPeerError, shm_supported

pytestmark = pytest.mark.skipif(shm_supported() is not None, reason=f"shm channel unsupported: {shm_supported()}")


def _collectives(rank: int, world_size: int, tp: int, cp: int) -> dict:
    from ryzlab.parallel import shm
    from ryzlab.parallel.mesh import init_parallel

    shm.DEFAULT_CAPACITY = 256   # small, so the large all-gather below regrows every channel
    g = init_parallel(ParallelConfig(tp=tp, cp=cp, cpu_comm="shm"))
    ref = init_parallel(ParallelConfig(tp=tp, cp=cp))   # a second mesh: gloo
    gen = torch.Generator().manual_seed(rank)
    out: dict = {"transport": [c.transport for c in g.comms()], "gloo": [c.transport for c in ref.comms()]}
    cases = []
    for step in range(5):   # more than two: the double-buffered slots are reused
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 17 + step, generator=gen).to(dtype)
            cases.append((x, 64 * 1024 if step == 4 else 0))
    for x, extra in cases:
        for mine, theirs in ((g.tp, ref.tp), (g.cp, ref.cp), (g.control, ref.control)):
            a, b = mine.all_reduce(x.clone()), theirs.all_reduce(x.clone())
            rel = ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1)).max().item()
            out.setdefault(f"reduce_{x.dtype}", []).append(rel)
            y = torch.randn(extra + 5, generator=gen)
            out.setdefault("gather", []).append(torch.equal(mine.all_gather(y), theirs.all_gather(y)))
            mine.barrier()
        # a max reduction goes through gloo, in order with the shm ones around it
        m = g.tp.all_reduce(torch.tensor([float(rank)]), op=torch.distributed.ReduceOp.MAX)
        out.setdefault("max", []).append(m.item())
    out["capacity"] = g.tp.shm.capacity if g.tp.shm is not None else None
    out["sum_bits"] = g.tp.all_reduce(torch.full((4,), 0.1 * (rank + 1))).tolist()
    out["ledger"] = g.tp.ledger.records["untracked"].collectives
    out["shm_files"] = [f for f in os.listdir("/dev/shm") if f.startswith("ryzlab-")]
    return out


@pytest.mark.parametrize("tp,cp", [(2, 1), (1, 3), (2, 2)])
def test_shm_collectives_equal_gloo_on_every_rank(tp, cp):
    res = launch(_collectives, tp * cp, args=(tp, cp), backend="gloo", threads_per_rank=1)
    for r in res:
        assert r["transport"] == ["shm" if n > 1 else "none" for n in (tp, cp, tp * cp)]
        assert r["gloo"] == ["gloo" if n > 1 else "none" for n in (tp, cp, tp * cp)]
        # sums of 2-4 parts may round apart from gloo's order: by float32's last bits, bf16's last unit
        assert max(r["reduce_torch.float32"]) < 1e-6
        assert max(r["reduce_torch.bfloat16"]) <= 2 ** -5   # a few bf16 roundings of partial sums
        assert all(r["gather"])
        if tp > 1:
            assert r["capacity"] >= 64 * 1024 * 4   # regrown past the first 256 bytes
        assert r["shm_files"] == []   # unlinked as soon as every rank mapped it
    # every rank of a group holds the same bits after a reduction
    by_tp = {}
    for rank, r in enumerate(res):
        assert r["max"] == [float(rank // tp * tp + tp - 1)] * len(r["max"])   # the tp group's highest rank
        by_tp.setdefault(rank // tp, []).append(r["sum_bits"])
    for bits in by_tp.values():
        assert all(b == bits[0] for b in bits)


def test_a_peer_that_exits_fails_the_collective_not_hangs(tmp_path):
    path = str(tmp_path / "seg")
    chan = ShmChannel(path, 0, 2, 64, create=True, timeout_s=600)
    peer = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    chan._pids[1] = int(peer.stdout)   # a process that has exited (and been reaped)
    with pytest.raises(ShmPeerError, match=r"rank\(s\) \[1\] of this group exited"):
        chan.all_reduce_(torch.ones(4))
    chan.close()


def test_a_peer_that_never_arrives_times_out(tmp_path):
    chan = ShmChannel(str(tmp_path / "seg"), 0, 2, 64, create=True, timeout_s=0.0)
    chan._pids[1] = os.getpid()   # alive, never posts
    with pytest.raises(ShmPeerError, match=r"rank\(s\) \[1\] did not arrive"):
        chan.barrier()
    chan.close()


def test_segment_layout_and_refusals(tmp_path):
    path = str(tmp_path / "seg")
    chan = ShmChannel(path, 0, 3, 128, create=True)
    assert os.path.getsize(path) == 2 * FLAG_BYTES * 3 + 2 * 3 * 128
    with pytest.raises(FileExistsError):   # never reuses (or follows) an existing file
        ShmChannel(path, 0, 3, 128, create=True)
    with pytest.raises(ShmPeerError, match="expected"):
        ShmChannel(path, 1, 3, 256, create=False)   # a peer with another idea of the size
    os.symlink(path, tmp_path / "link")
    with pytest.raises(OSError):
        ShmChannel(str(tmp_path / "link"), 1, 3, 128, create=False)
    chan.close()
    with pytest.raises(ValueError, match="cpu_comm='tcp' is not valid; choose one of 'gloo', 'shm'"):
        ParallelConfig(tp=2, cpu_comm="tcp")
