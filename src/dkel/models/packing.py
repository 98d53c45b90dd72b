"""Packed peers: K networks of one architecture run as one grouped network.

`group` turns K modules of identical structure into one whose convolutions have K times
the groups, whose BatchNorms have K times the channels and whose linear layers are
batched over the K peers; it takes peer-major grouped activations [B, K*C, H, W] and
gives what the K modules give, stacked.  `PackedPeers` holds such a network and keeps
the state_dict layout of the nn.ModuleList of the K modules, so checkpoints do not
depend on packing.  `ViewBatchNorm2d` is the shared trunk's BatchNorm when the K views
go through it as one batch: statistics per view, running statistics equal to K
sequential updates.

Only module types listed here (or marked with `@packable`) are packed; anything else
raises `NotPackable` naming the type, so foreign networks fall back to the unpacked path."""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import DkelError


class NotPackable(DkelError):
    """A module (or setting) that the packer does not know how to group."""


# containers whose forward only applies their children and elementwise arithmetic, so the
# grouped container is the same code over grouped children; a `groups` attribute (1 unpacked,
# K packed) lets a container reshape where its forward depends on the channel layout
PACKABLE: set[type] = {nn.Sequential}
# modules without state that act on every channel alike (their grouped version is themselves)
STATELESS: tuple[type, ...] = (nn.ReLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)


def channels_last(x: Tensor) -> bool:
    """True for a channels-last activation (one that is also NCHW-contiguous counts as NCHW)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def packable(cls: type) -> type:
    """Class decorator: instances of exactly this container type may be packed."""
    PACKABLE.add(cls)
    return cls


class GroupedLinear(nn.Module):
    """K linear layers as one batched matrix product: [K, B, in] -> [K, B, out].

    Weight [K*out, in] and bias [K*out] are the K layers' tensors concatenated, like a
    grouped convolution's."""

    def __init__(self, peers: int, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.peers, self.in_features, self.out_features = peers, in_features, out_features
        self.weight = nn.Parameter(torch.empty(peers * out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(peers * out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.view(self.peers, self.out_features, self.in_features).transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.view(self.peers, 1, self.out_features), x, w)


def _by_view(t: Tensor, views: int, free: bool) -> Tensor:
    """[V*B, C, H, W] -> [V, C, B, H, W]: with `free` (channels-last), a view that is
    channels-last-3d (what the CPU group norm reads); else a contiguous copy."""
    n, c, h, w = t.shape
    if free:
        return t.as_strided((views, c, n // views, h, w), (n // views * h * w * c, 1, h * w * c, w * c, c))
    return t.view(views, n // views, c, h, w).transpose(1, 2).contiguous()


def _stacked(t: Tensor) -> Tensor:
    """The inverse of `_by_view` (a copy)."""
    v, c, b, h, w = t.shape
    out = t.new_empty(v * b, c, h, w)
    out.view(v, b, c, h, w).copy_(t.transpose(1, 2))
    return out


class _PerViewNorm(torch.autograd.Function):
    """Batch normalisation of each of `views` stacked views with its own statistics, as a group
    norm with one group per channel over [V, C, B, H, W]; returns (y, the sums [V, C, 1, 1, 1]
    whose mean the running statistics need, rstd [V, C]).  A Function of its own so the layout
    changes cost no autograd nodes.

    The input is first centred on its per-view means: the CPU group norm computes the variance
    as E[x^2] - E[x]^2, which loses ~1e-3 of fp32 precision where the mean is ~30x the spread
    (BatchNorm does not)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], views: int, eps: float,
                grad: bool):
        free = x.device.type == "cpu" and channels_last(x)  # on CUDA group norm takes contiguous input only
        x5 = _by_view(x, views, free)
        w, b = weight, bias
        if w is not None and w.dtype != x.dtype:  # autocast: the affine in the activations' dtype
            w, b = w.to(x.dtype), b.to(x.dtype)
        c = x.shape[1]
        count = x.numel() // (views * c)
        # float32 sums under autocast too (the running means come from them); a mean would cost four
        # more operator calls
        if x5.dtype in (torch.float32, torch.float64):
            sums = x5.sum(dim=(2, 3, 4), keepdim=True)
            x5 = torch.sub(x5, sums, alpha=1.0 / count)
        else:
            sums = x5.sum(dim=(2, 3, 4), keepdim=True, dtype=torch.float32)
            x5 = torch.sub(x5, sums.to(x5.dtype), alpha=1.0 / count)
        y5, centred_mean, rstd = torch.native_group_norm(x5, w, b, views, c, count, c, eps)
        if free and y5.is_contiguous(memory_format=torch.channels_last_3d):
            # the channels-last result over the same memory; with autograd on, as a tensor of its own:
            # autograd forbids in-place changes (ReLU) of a view made inside a Function
            y = (x.new_empty(0).set_(y5.untyped_storage(), y5.storage_offset(), x.shape, x.stride()) if grad
                 else y5.as_strided(x.shape, x.stride()))
        else:
            y = _stacked(y5)
        ctx.save_for_backward(x5, centred_mean, rstd, w)
        ctx.views, ctx.free = views, free
        ctx.dtypes = (None if weight is None else weight.dtype, x.dtype)
        ctx.mark_non_differentiable(sums, rstd)
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        return y, sums, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor, *_):
        x5, mean, rstd, w = ctx.saved_tensors  # the centred input and its statistics
        if ctx.free and not channels_last(gy):
            gy = gy.contiguous(memory_format=torch.channels_last)
        if gy.dtype != ctx.dtypes[1]:
            gy = gy.to(ctx.dtypes[1])
        gy5 = _by_view(gy, ctx.views, ctx.free)
        v, c = mean.shape
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(gy5, x5, mean, rstd, w, v, c, x5.numel() // (v * c),
                                                               c, [need[0], need[1], need[2]])
        if gw is not None and gw.dtype != ctx.dtypes[0]:
            gw, gb = gw.to(ctx.dtypes[0]), gb.to(ctx.dtypes[0])
        if gx is not None:
            gx = gx.as_strided(gy.shape, gy.stride()) if ctx.free else _stacked(gx)
        return gx, gw, gb, None, None, None


class ViewBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over a batch of `views` stacked views ([V*B, C, H, W]) that normalises each
    view with its own statistics, as V separate passes would, in one pass (`_PerViewNorm`).
    Its running statistics are updated by the `PerViewNorms` that owns it, together with
    those of the whole trunk."""

    views: int = 1
    slot: int = 0  # its place among the owner's tracked norms
    pending: Optional[list] = None  # where the owner collects (slot, mean, rstd) of a pass

    def forward(self, x: Tensor) -> Tensor:
        if self.views == 1 or not self.training:
            return super().forward(x)
        y, sums, rstd = _PerViewNorm.apply(x, self.weight, self.bias, self.views, self.eps, torch.is_grad_enabled())
        if self.track_running_stats:
            self.pending.append((self.slot, sums, rstd, x.numel() // x.shape[1] // self.views))
        return y


class PerViewNorms:
    """The BatchNorms of a trunk that runs V views as one batch, as ViewBatchNorm2d modules.

    Their running means and variances live as views in one [2, sum C] tensor (and their batch
    counters in one more), so that after a pass the V sequential updates of every layer, in
    closed form
        r <- (1-m)^V r + sum_k m (1-m)^(V-1-k) s_k,
    take a dozen operator calls instead of a dozen per layer.  The module buffers stay what the
    state_dict holds; `start` rebinds them if something (`.to()`) replaced them."""

    def __init__(self, trunk: nn.Module):
        check_packable(trunk)
        for m in trunk.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = ViewBatchNorm2d
        self.norms = [m for m in trunk.modules() if isinstance(m, ViewBatchNorm2d)]
        self.tracked = [m for m in self.norms if m.track_running_stats]
        self.pending: list = []
        for i, m in enumerate(self.tracked):
            m.slot, m.pending = i, self.pending
        self.stats: Optional[Tensor] = None  # [2, sum C]: running means, running variances
        self.counts: Optional[Tensor] = None  # num_batches_tracked of each norm
        self._views: list[tuple[Tensor, ...]] = []  # per tracked norm, its buffers as views of those
        self._cache: dict = {}
        self._bind()

    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def _bound(self) -> bool:
        """Whether the modules still hold the views (an identity test, which torch.compile can
        guard on; deepcopy keeps it, `.to()` and `.double()` break it)."""
        return len(self._views) == len(self.tracked) and all(
            m._buffers[name] is view for m, views in zip(self.tracked, self._views)
            for name, view in zip(self._NAMES, views))

    def _bind(self) -> None:
        if not self.tracked:
            return
        with torch.no_grad():
            self.stats = torch.stack([torch.cat([m._buffers[name] for m in self.tracked])
                                      for name in self._NAMES[:2]])
            self.counts = torch.stack([m._buffers[self._NAMES[2]] for m in self.tracked])
        offset = 0
        self._views = []
        for i, m in enumerate(self.tracked):
            c = m.num_features
            views = (self.stats[0, offset:offset + c], self.stats[1, offset:offset + c], self.counts[i])
            for name, view in zip(self._NAMES, views):
                m._buffers[name] = view
            self._views.append(views)
            offset += c
        self._cache.clear()

    def start(self, views: int) -> None:
        """Before a pass over `views` stacked views."""
        if not self._bound():
            self._bind()
        for m in self.norms:
            m.views = views
        self.pending.clear()

    @torch.no_grad()
    def finish(self) -> None:
        """After the pass: every layer's V running-statistics updates at once."""
        if not self.pending:
            return
        entries = sorted(self.pending, key=lambda e: e[0])
        self.pending.clear()
        v = entries[0][2].shape[0]
        sums = torch.cat([e[1] for e in entries], dim=1).view(v, -1)  # [V, sum C]
        rstd = torch.cat([e[2] for e in entries], dim=1)
        dtype = self.stats.dtype
        if sums.dtype != dtype:  # autocast
            sums, rstd = sums.to(dtype), rstd.to(dtype)
        decay, coef, neg_eps, one = self._coefficients(v, tuple(e[3] for e in entries), sums.device, dtype)
        # 1/rstd^2 - eps is each view's biased variance; the coefficients make it unbiased, as
        # BatchNorm keeps it, and weigh the sums as means
        observed = torch.stack([sums, torch.addcdiv(neg_eps, one, rstd * rstd)])
        self.stats.mul_(decay).add_((coef * observed).sum(1))
        self.counts.add_(v)

    def _coefficients(self, v: int, counts: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        """Per column of `stats`: (1-m)^V [2, sum C]; per view k [2, V, sum C] the weight
        m (1-m)^(V-1-k), divided by the n values per view for the sums and times n/(n-1) for the
        variances; -eps [sum C]; and a 1.  Built once per batch shape (compiled: graph constants)."""
        key = (v, counts, device, dtype)
        if torch.compiler.is_compiling():
            return self._build(*key)
        if key not in self._cache:
            self._cache[key] = self._build(*key)
        return self._cache[key]

    def _build(self, v: int, counts: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        decay: list[float] = []
        eps: list[float] = []
        per_sum: list[list[float]] = [[] for _ in range(v)]
        per_var: list[list[float]] = [[] for _ in range(v)]
        for m, n in zip(self.tracked, counts):
            mom, unbiased, c = m.momentum, n / max(n - 1, 1), m.num_features
            coef = [mom * (1 - mom) ** (v - 1 - k) for k in range(v)]
            for k in range(v):
                per_sum[k] += [coef[k] / n] * c
                per_var[k] += [coef[k] * unbiased] * c
            decay += [(1 - mom) ** v] * c
            eps += [-m.eps] * c
        t = partial(torch.tensor, device=device, dtype=dtype)
        return t([decay, decay]), t([per_sum, per_var]), t(eps), t([1.0])


def plain_norms(module: nn.Module) -> nn.Module:
    """Undo PerViewNorms (on a copy the caller owns): plain BatchNorm2d with buffers of their own."""
    for m in module.modules():
        if type(m) is ViewBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
            for name in ("views", "slot", "pending"):
                m.__dict__.pop(name, None)
            for name, buf in m._buffers.items():
                if buf is not None:
                    m._buffers[name] = buf.clone()
    return module


# ----------------------------------------------------------------------------- grouping
def _times(n: int, k: int) -> int:
    """n grouped k-fold (k > 0), or a grouped n back to one peer's share (k < 0)."""
    return n * k if k > 0 else n // -k


def _conv(m: nn.Conv2d, k: int) -> nn.Conv2d:
    return nn.Conv2d(_times(m.in_channels, k), _times(m.out_channels, k), m.kernel_size, m.stride, m.padding,
                     m.dilation, _times(m.groups, k), m.bias is not None, m.padding_mode, device="meta")


def _norm(m: nn.BatchNorm2d, k: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(_times(m.num_features, k), m.eps, m.momentum, m.affine, m.track_running_stats,
                          device="meta")


def _grouped_linear(m: nn.Linear, k: int) -> GroupedLinear:
    return GroupedLinear(k, m.in_features, m.out_features, m.bias is not None, device="meta")


def _linear(m: GroupedLinear, k: int) -> nn.Linear:
    return nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")


# leaf type -> empty (meta) shell of its grouped version, and of a grouped one's single version
GROUPED: dict[type, Callable[[nn.Module, int], nn.Module]] = {
    nn.Conv2d: _conv, nn.BatchNorm2d: _norm, nn.Linear: _grouped_linear}
SINGLE: dict[type, Callable[[nn.Module, int], nn.Module]] = {
    nn.Conv2d: _conv, nn.BatchNorm2d: _norm, GroupedLinear: _linear}


def check_packable(module: nn.Module) -> None:
    """Raise NotPackable naming the first module the packer does not know how to group."""
    for name, m in module.named_modules():
        t = type(m)
        where = f" (at {name})" if name else ""
        if not (t in PACKABLE or t in STATELESS or t in GROUPED or t is ViewBatchNorm2d):
            raise NotPackable(f"cannot pack module type {t.__module__}.{t.__qualname__}{where}")
        if isinstance(m, nn.BatchNorm2d) and m.momentum is None:
            raise NotPackable(f"cannot pack BatchNorm2d with momentum=None (cumulative averages){where}")


def split(t: Optional[Tensor], k: int) -> list[Optional[Tensor]]:
    """The k peers' parts of a packed tensor: chunks along dim 0; a scalar is every peer's."""
    if t is None:
        return [None] * k
    return list(t.chunk(k)) if t.dim() else [t] * k


def join(parts: list[Optional[Tensor]]) -> Optional[Tensor]:
    if parts[0] is None:
        return None
    return torch.cat(parts) if parts[0].dim() else parts[0].clone()


def _shell(module: nn.Module) -> nn.Module:
    """A copy of a container without its children (they are filled in by the caller)."""
    return copy.deepcopy(module, {id(child): None for child in module.children()})


def _restructure(modules: list[nn.Module], k: int, to_grouped: bool) -> nn.Module:
    """A meta-device shell of the grouped (or, from a grouped module, the single) structure."""
    m = modules[0]
    t = type(m)
    if any(type(x) is not t for x in modules):
        raise NotPackable(f"peers differ in structure ({t.__qualname__} and {type(modules[-1]).__qualname__})")
    leaves = GROUPED if to_grouped else SINGLE
    if t in leaves:
        return leaves[t](m, k if to_grouped else -k)
    if t in STATELESS:
        return copy.deepcopy(m)
    if t not in PACKABLE:
        raise NotPackable(f"cannot pack module type {t.__module__}.{t.__qualname__}")
    shell = _shell(m)
    for name in m._modules:
        shell._modules[name] = _restructure([x._modules[name] for x in modules], k, to_grouped)
    if hasattr(shell, "groups"):
        shell.groups = k if to_grouped else 1
    return shell


def _finish(shell: nn.Module, state: dict[str, Tensor], like: nn.Module) -> nn.Module:
    """Fill a shell with `state`, and copy modes and requires_grad flags from `like`."""
    shell.load_state_dict(state, assign=True)
    for a, b in zip(shell.modules(), like.modules()):
        a.training = b.training
    grads = {n: p.requires_grad for n, p in like.named_parameters()}
    for n, p in shell.named_parameters():
        p.requires_grad_(grads[n])
    return shell


def group(modules: list[nn.Module]) -> nn.Module:
    """One grouped module computing what the K `modules` compute, on grouped activations."""
    k = len(modules)
    shell = _restructure(modules, k, True)
    states = [m.state_dict() for m in modules]
    return _finish(shell, {name: join([s[name] for s in states]) for name in states[0]}, modules[0])


def ungroup(grouped: nn.Module, peer: int, k: int) -> nn.Module:
    """Peer `peer` of a grouped module as a plain module with its own tensors."""
    shell = _restructure([grouped], k, False)
    state = {n: split(t, k)[peer].clone() for n, t in grouped.state_dict().items()}
    return _finish(shell, state, grouped)


class PackedPeers(nn.Module):
    """K modules of one architecture as one grouped module `net`, seen from outside (len,
    indexing, state_dict, load_state_dict) as the nn.ModuleList of the K modules."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.peers = len(modules)
        self.net = group(modules)
        self.register_state_dict_post_hook(_unpacked_state)
        self.register_load_state_dict_pre_hook(_packed_state)

    def __len__(self) -> int:
        return self.peers

    def __getitem__(self, i: int) -> nn.Module:
        if not -self.peers <= i < self.peers:
            raise IndexError(f"peer {i} of {self.peers}")
        return ungroup(self.net, i % self.peers, self.peers)

    def forward(self, *args):
        return self.net(*args)


def _unpacked_state(module: PackedPeers, state: dict, prefix: str, metadata) -> None:
    inner = prefix + "net."
    parts = {key[len(inner):]: split(state.pop(key), module.peers) for key in [k for k in state if k.startswith(inner)]}
    for i in range(module.peers):
        for name, tensors in parts.items():
            state[f"{prefix}{i}.{name}"] = tensors[i]
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        for key in [k for k in meta if k == prefix + "net" or k.startswith(inner)]:
            value = meta.pop(key)
            for i in range(module.peers):
                meta[f"{prefix}{i}{key[len(prefix) + 3:]}"] = value


def _packed_state(module: PackedPeers, state: dict, prefix: str, *_) -> None:
    for name in module.net.state_dict(keep_vars=True):
        keys = [f"{prefix}{i}.{name}" for i in range(module.peers)]
        if all(k in state for k in keys):
            state[f"{prefix}net.{name}"] = join([state.pop(k) for k in keys])


def parameter_map(root: nn.Module) -> list[tuple[int, int, int]]:
    """For each parameter of the unpacked form of `root`, in its order: (index of the
    registered parameter holding it, its part, number of parts).  Converts per-parameter
    state (optimizer momenta) between the packed and the unpacked layout."""
    packed = [(f"{prefix}.net." if prefix else "net.", m.peers) for prefix, m in root.named_modules()
              if isinstance(m, PackedPeers)]
    out: list[tuple[int, int, int]] = []
    run: list[int] = []
    run_of: Optional[tuple[str, int]] = None

    def flush() -> None:
        if run_of is not None:
            out.extend((j, part, run_of[1]) for part in range(run_of[1]) for j in run)
        run.clear()

    for j, (name, _) in enumerate(root.named_parameters()):
        owner = next((p for p in packed if name.startswith(p[0])), None)
        if owner != run_of:
            flush()
            run_of = owner
        if owner is None:
            out.append((j, 0, 1))
        else:
            run.append(j)
    flush()
    return out


def unpacked_optimizer_state(layout: list[tuple[int, int, int]], state: dict) -> dict:
    """An optimizer state_dict over packed parameters, rewritten as the one the same optimizer
    would have over the unpacked parameters (`layout` from `parameter_map`)."""
    per = state["state"]
    out = {j: {key: split(v, k)[part] if isinstance(v, Tensor) else v for key, v in per[a].items()}
           for j, (a, part, k) in enumerate(layout) if a in per}
    groups = [{**g, "params": [j for j, (a, _, _) in enumerate(layout) if a in set(g["params"])]}
              for g in state["param_groups"]]
    return {"state": out, "param_groups": groups}


def packed_optimizer_state(layout: list[tuple[int, int, int]], state: dict) -> dict:
    """The inverse of `unpacked_optimizer_state`."""
    per = state["state"]
    parts: dict[int, list[int]] = {}
    for j, (a, part, _) in enumerate(layout):
        parts.setdefault(a, []).append(j)
    out = {}
    for a, js in parts.items():
        if js[0] in per:
            out[a] = {key: join([per[j][key] for j in js]) if isinstance(v, Tensor) else v
                      for key, v in per[js[0]].items()}
    groups = [{**g, "params": sorted({layout[j][0] for j in g["params"]})} for g in state["param_groups"]]
    return {"state": out, "param_groups": groups}
