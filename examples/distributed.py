"""Data-parallel (DDP) or sharded (FSDP2) training with masked SGD, optionally in mixed precision.

Runs on CPU with the gloo backend, so it works on any machine:

    python examples/distributed.py --parallel ddp --amp fp16     # DDP + autocast fp16 + GradScaler
    python examples/distributed.py --parallel fsdp --amp bf16    # fully_shard + autocast bf16

Each of ``--world`` processes trains on its share of every batch of the docs/algorithm.md §8 benchmark
(``synthetic:xor``). ``ModalSignificance`` all-reduces its statistics, so every rank sets the same
rates; the masks are a pure function of (seed, step, tensor index), so every rank draws the same
ones (FSDP: each rank its part of the unsharded mask). At the end rank 0 prints every rank's test
accuracy and a checksum of the gathered parameters: they agree across ranks.
"""

from __future__ import annotations

import argparse
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from masked_optim import MaskedMultiModalSGD, ModalSignificance, modality_param_groups
from masked_optim.experiments import build_model
from masked_optim.experiments.data import load_dataset


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    # Training runs in its own function, so that the DDP/FSDP wrappers, which hold the process group,
    # are freed here, while the group is alive: freed after destroy_process_group (when the worker's
    # frame is cleared), a DDP reducer now and then hung the process at exit (5 runs in 20, 2026-12-05).
    line = train(rank, args)
    gc.collect()
    lines = [None] * args.world
    dist.all_gather_object(lines, line)  # printed by one process, so the lines never interleave
    if rank == 0:
        print("\n".join(lines), flush=True)
    dist.barrier()  # no rank tears gloo down while another still uses it (that aborted a rank now and then)
    dist.destroy_process_group()


def train(rank: int, args: argparse.Namespace) -> str:
    """Train on this rank's share of every batch; return the line that rank 0 prints for this rank."""
    data = load_dataset("synthetic:xor")
    (x_train, y_train), (x_test, y_test) = data.train, data.test
    torch.manual_seed(0)  # the same initial model on every rank
    model = build_model(data.shapes, data.num_classes)
    if args.parallel == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (args.world,))
        for module in [*model.encoders.values(), model.head]:
            fully_shard(module, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
    # Built after wrapping, so that FSDP's sharded parameters are the ones optimised.
    opt = MaskedMultiModalSGD(modality_param_groups(model.encoders, shared=model.head),
                              lr=0.01, momentum=0.9, weight_decay=1e-4, mask="amss")
    estimator = ModalSignificance()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
    scaler = torch.amp.GradScaler("cpu", enabled=args.amp == "fp16")
    gen = torch.Generator().manual_seed(1)  # the same batch order on every rank
    n, share = y_train.shape[0], args.batch // args.world
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - args.batch + 1, args.batch):
            idx = order[start + rank * share : start + (rank + 1) * share]  # this rank's share
            x, y = {m: v[idx] for m, v in x_train.items()}, y_train[idx]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                out = net(x)
                loss = F.cross_entropy(out.logits, y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            rates = estimator({m: o.detach().float() for m, o in out.modality_logits.items()}, y,
                              {m: z.detach().float() for m, z in out.features.items()})
            opt.set_rates(rates)
            scaler.step(opt)  # an inf/NaN gradient skips the step on every rank alike
            scaler.update()
    with torch.no_grad():
        acc = (net(x_test).logits.argmax(1) == y_test).float().mean().item()
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        checksum = sum(float(p.double().sum()) for p in full)
    return f"rank {rank}: {args.parallel} {args.amp} test accuracy {acc:.4f} rates {rates} param checksum {checksum:.10f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="global batch, split evenly over the ranks")
    args = parser.parse_args(argv)
    if args.world < 1 or args.batch % args.world:
        parser.error(f"--batch {args.batch} must be a positive multiple of --world {args.world}")
    if args.parallel == "fsdp" and args.amp == "fp16":
        parser.error("--amp fp16 uses GradScaler, which this example pairs with DDP; use --amp bf16 with fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
