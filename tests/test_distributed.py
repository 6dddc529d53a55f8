"""Distributed training on CPU: two gloo processes under DDP and under FSDP2's ``fully_shard`` (per block)
take a few optimiser steps on different data; both ranks must end with identical (full) weights.

Marked slow: spawning the processes costs more than the training (CI runs these with ``-m slow``)."""

from __future__ import annotations

import importlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deit_registry import DeiT

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 3
# FSDP2's fully_shard is public API (torch.distributed.fsdp) from torch 2.6 on.
HAS_FSDP2 = hasattr(importlib.import_module("torch.distributed.fsdp"), "fully_shard")
MODES = ("ddp", "fsdp2") if HAS_FSDP2 else ("ddp",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model() -> DeiT:
    torch.manual_seed(0)  # same initial weights on every rank
    return DeiT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, distilled=True)


def _train(rank: int, mode: str, result_dir: str) -> None:
    model = _tiny_model()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for _ in range(STEPS):
        x = torch.randn(2, 3, 32, 32, generator=generator)
        y = torch.randint(0, 4, (2,), generator=generator)
        loss = torch.nn.functional.cross_entropy(wrapped(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if mode == "ddp":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        # FSDP2 parameters are DTensors sharded on dim 0: gather the full tensors to compare.
        state = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, f"{result_dir}/{mode}-rank{rank}.pt")


def _worker(rank: int, port: int, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        for mode in MODES:  # one spawn for both: starting processes costs more than the training
            _train(rank, mode, result_dir)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    try:
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    except mp.ProcessExitedException as e:
        # Once in many CI runs a rank died in gloo's C++ ("terminate called without an active exception",
        # SIGABRT) before any Python error: a fault of the process group, not of the model. A rank that
        # raises, or wrong weights, still fail at once; a second death fails too.
        if e.signal_name is None:
            raise
        mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD_SIZE, join=True)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_end_with_identical_weights(mode, results):
    if mode not in MODES:
        pytest.skip("needs FSDP2's public torch.distributed.fsdp.fully_shard (torch >= 2.6)")
    rank0 = torch.load(results / f"{mode}-rank0.pt", weights_only=True)
    rank1 = torch.load(results / f"{mode}-rank1.pt", weights_only=True)
    initial = _tiny_model().state_dict()
    assert rank0.keys() == rank1.keys() == initial.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # the optimiser really moved the weights (from the same start on both ranks)
    assert not torch.equal(rank0["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert not torch.equal(rank0["head_dist.weight"], initial["head_dist.weight"])
