"""Running the trainer on one process or many: data parallel with FSDP2 and expert parallel (EP).

Layout for W ranks and EP degree P (P divides W): ranks [g*P, (g+1)*P) form EP group g and hold all
routed experts between them, rank r the contiguous block of E / P experts of device r % P; ranks with the same
r % P form an expert-data-parallel group (EDP, size W / P) that FSDP shards those experts over. Everything
else (attention, router, shared experts, dense layers) is FSDP-sharded over all W ranks. With EP > 1 the
devices of device-limited routing, the device and communication losses and token dropping are the EP ranks.

Gradients: every rank's loss is its local mean, and FSDP averages over W, so dense gradients are the global
mean. An expert on rank r receives the gradient of every loss in its EP group (through the all-to-all), summed;
FSDP sums those over EDP, so dividing by W (set_gradient_divide_factor) gives the same global mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from dsv2.hardware import check_device
from dsv2.model.moe import DeviceCapacity, DropPolicy, Experts, Routing, kept_pairs
from dsv2.train.routing import moe_layers


class Checkpointed(nn.Module):
    """Recompute a decoder block in backward instead of keeping its activations (non-reentrant checkpoint)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> torch.Tensor:
        return checkpoint(self.block, *args, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every decoder block. Parameter names gain `.block`; state dicts go through `unwrapped_state_dict`."""
    for i, block in enumerate(model.layers):
        model.layers[i] = Checkpointed(block)


class Local:
    """One process: no communication, the whole batch is this rank's."""

    rank, world, ep = 0, 1, 1
    is_main = True

    def __init__(self, device: str = "cpu") -> None:
        self.device = _device(device, 0)

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def drop_policy(self, dropping: DeviceCapacity | None) -> DropPolicy | None:
        return dropping

    def shard(self, ids: np.ndarray) -> np.ndarray:
        return ids

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def grad_norm_sq(self, local_sq: torch.Tensor) -> torch.Tensor:
        return local_sq

    def barrier(self) -> None:
        pass

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return unwrapped_state_dict(model)

    def close(self) -> None:
        pass


def unwrapped_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the plain Transformer's names (without activation-checkpoint wrappers)."""
    return {k.replace(".block.", "."): v for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ all-to-all
class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
               ) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallel(nn.Module):
    """This rank's block of routed experts; tokens from the whole EP group come in and go back by all-to-all.

    Same call as Experts: (x_TH, routing with *global* expert ids) -> weighted sum of the chosen experts.
    """

    def __init__(self, local: Experts, n_experts: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.local, self.n_experts, self.group = local, n_experts, group
        self.per_rank = local.n_experts
        self.ep = dist.get_world_size(group)

    def forward(self, x_TH: torch.Tensor, routing: Routing) -> torch.Tensor:
        K = routing.indices.shape[1]
        pair = kept_pairs(routing)
        expert = routing.indices.flatten()[pair]
        order = pair[expert.argsort(stable=True)]  # experts are contiguous per rank: sorted by rank too
        expert = routing.indices.flatten()[order]
        token = order // K
        send = torch.bincount(expert // self.per_rank, minlength=self.ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        x_in = all_to_all(x_TH.index_select(0, token), recv_splits, send_splits, self.group)
        e_in = torch.empty(sum(recv_splits), dtype=expert.dtype, device=expert.device)
        dist.all_to_all_single(e_in, expert % self.per_rank, recv_splits, send_splits, group=self.group)
        by_expert = e_in.argsort(stable=True)
        counts = torch.bincount(e_in, minlength=self.per_rank).tolist()
        out_sorted = self.local.grouped(x_in.index_select(0, by_expert), counts, every_expert=True)
        out = torch.empty_like(out_sorted).index_copy(0, by_expert, out_sorted)  # back to arrival order
        out = all_to_all(out, send_splits, recv_splits, self.group)
        out = out.float() * routing.weights.flatten().index_select(0, order)[:, None]
        y_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        return y_TH.index_add_(0, token, out).to(x_TH.dtype)


@dataclass(frozen=True)
class GroupCapacity:
    """DeviceCapacity over the assignments of the whole EP group, so that dropping is decided exactly as one
    process holding the group's tokens would; only (affinity, device, protected) travel, not hidden states."""

    policy: DeviceCapacity
    group: dist.ProcessGroup

    def keep(self, routing: Routing, protected_T: torch.Tensor | None) -> torch.Tensor:
        T, E = routing.scores.shape
        device_TK = routing.indices // (E // self.policy.n_devices)
        affinity_TK = routing.scores.detach().gather(1, routing.indices)
        prot_T = torch.zeros(T, dtype=torch.bool, device=device_TK.device) if protected_T is None else protected_T
        rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
        gathered = [_all_gather(t, self.group, size) for t in (affinity_TK, device_TK, prot_T.to(torch.uint8))]
        kept = self.policy.keep_assignments(gathered[0], gathered[1], gathered[2].bool())
        return kept[rank * T:(rank + 1) * T]


def _all_gather(t: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    out = t.new_empty(size * t.shape[0], *t.shape[1:])
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


class Distributed:
    """torchrun: FSDP2 over all ranks, experts sharded over EP groups: gloo on CPUs, nccl on GPUs (one per rank,
    cuda:LOCAL_RANK)."""

    def __init__(self, ep: int, device: str = "cpu") -> None:
        self.device = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=10),
                                    device_id=self.device if self.device.type == "cuda" else None)
        self.rank, self.world, self.ep = dist.get_rank(), dist.get_world_size(), ep
        if self.world % ep:
            raise ValueError(f"config field 'moe.expert_parallel': {ep} does not divide the {self.world} ranks")
        self.is_main = self.rank == 0
        kind = self.device.type
        self.dp_mesh: DeviceMesh = init_device_mesh(kind, (self.world,), mesh_dim_names=("dp",))
        self.expert_mesh = init_device_mesh(kind, (self.world // ep, ep), mesh_dim_names=("edp", "ep"))
        self.ep_group = self.expert_mesh.get_group("ep")

    def prepare(self, model: nn.Module) -> nn.Module:
        for moe in moe_layers(model):
            if self.ep > 1:
                moe.experts = self._shard_experts(moe.experts)
            experts = fully_shard(moe.experts, mesh=self.expert_mesh["edp"])
            experts.set_gradient_divide_factor(float(self.world))
        for layer in model.layers:
            fully_shard(layer, mesh=self.dp_mesh)
        fully_shard(model, mesh=self.dp_mesh)
        return model

    def _shard_experts(self, experts: Experts) -> ExpertParallel:
        E = experts.n_experts
        if E % self.ep:
            raise ValueError(f"config field 'moe.expert_parallel': {E} routed experts do not split over EP={self.ep}")
        per = E // self.ep
        ep_rank = self.expert_mesh.get_local_rank("ep")
        local = Experts(per, experts.w13.shape[-1], experts.hidden)
        with torch.no_grad():
            local.w13.copy_(experts.w13[ep_rank * per:(ep_rank + 1) * per])
            local.w2.copy_(experts.w2[ep_rank * per:(ep_rank + 1) * per])
        return ExpertParallel(local, E, self.ep_group)

    def drop_policy(self, dropping: DeviceCapacity | None) -> DropPolicy | None:
        """Dropping decided over the whole EP group's assignments when experts are split over ranks."""
        if dropping is None or self.ep == 1:
            return dropping
        return GroupCapacity(dropping, self.ep_group)

    def shard(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) % self.world:
            raise ValueError(f"a step of {len(ids)} sequences does not split over {self.world} ranks")
        n = len(ids) // self.world
        return ids[self.rank * n:(self.rank + 1) * n]

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def grad_norm_sq(self, local_sq: torch.Tensor) -> torch.Tensor:
        # Every rank's local shards are disjoint pieces of the full gradient (dense: FSDP shards over W;
        # experts: an EP block, FSDP-sharded over EDP), so the squared norm is the sum over all ranks.
        return self.all_sum(local_sq)

    def barrier(self) -> None:
        dist.barrier()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Unsharded parameters under the plain Transformer's names (collective: every rank calls it)."""
        out = {}
        for name, value in unwrapped_state_dict(model).items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if ".experts.local." in name:  # EP blocks gathered in rank order are the experts in id order
                full = _all_gather(full, self.ep_group, self.ep)
                name = name.replace(".experts.local.", ".experts.")
            out[name] = full
        return out

    def close(self) -> None:
        dist.destroy_process_group()


def _device(kind: str, local_rank: int) -> torch.device:
    """The device a rank trains on: the CPU, or its own GPU; a clear error where CUDA is not there."""
    if kind == "cpu":
        return torch.device("cpu")
    try:
        check_device(kind)
    except ValueError as e:
        raise ValueError(f"config field 'train.device': {e}") from e
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"config field 'train.device': rank {local_rank} has no GPU of its own "
                         f"({torch.cuda.device_count()} visible); run at most that many processes per node")
    return torch.device("cuda", local_rank)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def from_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
