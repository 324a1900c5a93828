"""Data parallelism under torchrun: N processes train one SAE (torch.distributed; NCCL on GPUs, gloo on CPU).

Every rank holds the whole SAE and optimizer. A global batch of B rows is cut into N equal slices; each
rank computes its slice's share of the loss (its local mean × n_local / B), so the sum of the ranks'
gradients is the gradient of the global batch, and one all-reduce per step makes every rank take the same
optimizer step. Without torchrun (WORLD_SIZE unset) every helper here is a no-op and the run is the
single-process one.
"""
import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

# A collective waits this long for a rank that stopped answering, then raises; rank 0 meanwhile may load
# a model or harvest its share, so the bound is generous. A rank that dies outright is seen at once (its
# sockets close).
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """True in a process started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group torchrun describes (env:// rendezvous) and return this rank's device:
    cuda:LOCAL_RANK under NCCL, cpu under gloo. Outside torchrun: `device` unchanged."""
    if not launched():
        return device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return f"cuda:{local_rank()}" if cuda else device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def _comm_device() -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
            else torch.device("cpu"))


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `tensor` (a new tensor on the input's device); the tensor itself with one process."""
    if world_size() == 1:
        return tensor
    buffer = tensor.to(_comm_device(), copy=True)
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


def reduce_gradients(parameters) -> None:
    """p.grad ← Σ over ranks of p.grad, for every parameter, in one flattened all-reduce."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def broadcast_tensors(tensors) -> None:
    """Every rank's tensors ← rank 0's, in place."""
    if world_size() == 1:
        return
    for t in tensors:
        buffer = t.detach().to(_comm_device(), copy=True)
        dist.broadcast(buffer, src=0)
        t.data.copy_(buffer.to(t.device))


def broadcast_object(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (it may download or convert into the shared cache), then the other
    ranks."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(function, error: type = RuntimeError):
    """function() run on rank 0 alone; every rank returns its result, or raises `error` with rank 0's message
    when it raised one (so that every rank stops with the same one-line error)."""
    if world_size() == 1:
        return function()
    outcome = None
    if is_main():
        try:
            outcome = ("ok", function())
        except error as e:
            outcome = ("error", str(e))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise error(outcome[1])
    return outcome[1]


def quiet_unless_main() -> None:
    """Ranks other than 0 print nothing to stdout (their progress bars are off too); errors still reach
    stderr."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")


def shard(n: int) -> slice:
    """This rank's contiguous share of n items (the first n % N ranks take one more)."""
    size, r = world_size(), rank()
    per, extra = divmod(n, size)
    start = r * per + min(r, extra)
    return slice(start, start + per + (r < extra))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
