"""SaRA on several processes: it synchronises its own gradients, only the selected values.

How to prepare model and optimizer
----------------------------------
Create the optimizer on the **bare** model (e.g. ``pipe.unet``), on every
process, after the process group exists and before any wrapping. Then train as
usual; wrapping the model in DistributedDataParallel afterwards is allowed
(Accelerate does it) and changes nothing for SaRA's weights.

**Accelerate** (the diffusers training scripts): change only the optimizer line::

    accelerator = Accelerator(gradient_accumulation_steps=4)
    optimizer = SaRAAdamW(unet, lr=1e-4)      # was torch.optim.AdamW(unet.parameters(), lr=1e-4)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler)
    for batch in train_dataloader:
        with accelerator.accumulate(unet):
            ...
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), max_grad_norm)
            optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()

Launch with ``accelerate launch --multi_gpu --num_processes N train.py`` (on a
machine without GPUs and with ``Accelerator(cpu=True)`` this runs N CPU
processes on gloo). Beware: accelerate 1.15 given ``distributed_type: MULTI_CPU``
in a config file and no ``--mpirun_hostfile`` starts a *single* process
(``DistributedType.NO``): check ``accelerator.num_processes``.

**torch.distributed** (``torchrun``): ``init_process_group``, then the optimizer
on the bare model, then (optionally) ``DistributedDataParallel(model)``::

    dist.init_process_group("nccl")                    # "gloo" on CPU
    optimizer = SaRAAdamW(unet, lr=1e-4)
    ddp_unet = DistributedDataParallel(unet)           # optional
    for i, batch in enumerate(local_batches):          # each rank its share of the global batch
        last = (i + 1) % accumulation == 0
        with contextlib.nullcontext() if last else ddp_unet.no_sync():   # or optimizer.no_sync()
            (loss(ddp_unet, batch) / accumulation).backward()
        if last:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step(); optimizer.zero_grad()

Without the DDP wrapper, use ``optimizer.no_sync()`` for the backward passes
that only accumulate (or let every pass synchronise: still exact, more bytes).

What SaRA does: at the end of each backward pass that synchronises (outside
``no_sync``), it all-reduces the gathered 1-D gradients of the selected
entries, averaged over the processes (25 MB buckets, plus one flag per weight
saying whether it got a gradient anywhere). That is what DDP does for a dense
model, on ``selected / trainable`` of the bytes (``optimizer.sync.bytes_communicated``
counts them). So clipping, logging and ``step()`` all see the gradient of the
global batch, and everything after it is computed identically on every rank
from identical numbers: the AdamW step, progressive adjustment, the nuclear
norm's random choice (same seed), frozen entries. Ranks stay bit-for-bit
identical and match one process with the global batch.

DDP never sees SaRA's weights (see :class:`DDPCompanion`): no dense gradient
buckets (the memory saving is kept) and no dense all-reduce.

Requirements and refusals (never silently wrong):

* every rank attaches to the same weights with the same settings; the first
  synchronisation checks it (``ConfigError`` if not), and every rank runs the
  same number of backward passes (as with DDP);
* ``SaRAAdamW(ddp_model)`` (attaching *after* wrapping) raises ``ConfigError``, and so
  does the first forward pass through a DDP wrapper built before SaRA attached, or
  wrapping a parent of the module SaRA attached to (DDP would reduce SaRA's weights);
  tied weights are fine (every name of a trained weight is on DDP's ignore list);
* ``WORLD_SIZE > 1`` while Accelerate says ``DistributedType.NO`` (``torchrun`` on a
  machine without GPUs and without ``ACCELERATE_USE_CPU=true``: the data would not be
  sharded) raises at attach and at every step;
* FSDP, DeepSpeed (ZeRO), Megatron-LM and XLA shard or replace the weights and
  the optimizer SaRA trains in place: ``ConfigError`` at attach or first step;
* ``WORLD_SIZE > 1`` without an initialised process group raises at the first
  step (the processes would train independently);
* a gradient norm taken after a backward pass inside ``no_sync`` (not yet
  averaged) raises.
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref

import torch
from torch import nn

from ..errors import ConfigError
from .grad import SelectedGrad

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size
_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"  # what DistributedDataParallel.__init__ reads
_UNSUPPORTED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun / accelerate launch (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def distributed_run() -> bool:
    """A process group exists, or a launcher started several processes (it may be created later)."""
    dist = torch.distributed
    return (dist.is_available() and dist.is_initialized()) or launched_world_size() > 1


# ------------------------------------------------------------------ refusing what cannot work


def _accelerate_distributed_type() -> str | None:
    """Accelerate's distributed type if the script created an Accelerator or a PartialState (never imports it)."""
    state = sys.modules.get("accelerate.state")
    for holder in ("AcceleratorState", "PartialState"):
        shared = getattr(getattr(state, holder, None), "_shared_state", None) or {}
        kind = shared.get("distributed_type")
        if kind is not None:
            return str(getattr(kind, "value", kind)).upper()
    return None


def _check_accelerate_shards_data() -> None:
    """Refuse one process of several that Accelerate runs as ``DistributedType.NO``.

    On a machine without GPUs, ``torchrun`` or ``accelerate launch --multi_gpu``
    start N processes, but Accelerate sets up a process group only when told to
    use the CPU; otherwise each process is ``DistributedType.NO``: ``prepare``
    neither shards the data loader nor wraps the model, and N processes train N
    copies on the same data (with SaRA also averaging their gradients if the
    script made a group itself). Nothing about the result would look wrong.
    """
    processes = max(launched_world_size(), world_size())
    if processes > 1 and _accelerate_distributed_type() == "NO":
        raise ConfigError(
            f"this is one of {processes} processes (WORLD_SIZE={os.environ.get('WORLD_SIZE', processes)}), but "
            "Accelerate runs it as DistributedType.NO: accelerator.prepare(...) neither shards the data nor "
            "wraps the model, so every process would train on all the data. On a machine without GPUs, set "
            "ACCELERATE_USE_CPU=true in the environment of the launch (or create Accelerator(cpu=True)); "
            "otherwise launch a single process.")


def check_supported_setup(model: nn.Module, what: str = "SaRAAdamW") -> None:
    """Refuse a model wrapped in DDP/FSDP/DeepSpeed and an Accelerate run that shards."""
    names = {c.__name__ for c in type(model).__mro__}
    if names & {"DistributedDataParallel", "DataParallel"}:
        raise ConfigError(
            f"{what} got a model already wrapped in {type(model).__name__}, whose reducer holds dense gradient "
            "buckets for every weight (and would average SaRA's freed gradients as zeros). Create the optimizer on "
            f"the bare model first, then wrap: optimizer = {what}(model, ...); ddp_model = "
            "DistributedDataParallel(model). With Accelerate, create it before accelerator.prepare(...).")
    _check_accelerate_shards_data()
    kind = _accelerate_distributed_type()
    if kind in _UNSUPPORTED_TYPES:
        raise ConfigError(
            f"{what} does not support Accelerate's distributed_type={kind}: it shards or replaces the weights "
            "and the optimizer that SaRA trains in place. Use plain data parallelism "
            "(accelerate launch --multi_gpu, i.e. DistributedType.MULTI_GPU / MULTI_CPU).")
    for module in model.modules():
        mro = {c.__name__ for c in type(module).__mro__}
        if mro & {"FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"}:
            raise ConfigError(f"{what} does not support {type(module).__name__} (FSDP/DeepSpeed shard the weights "
                              "SaRA trains in place); use plain data parallelism, with the model unwrapped")
    for name, p in model.named_parameters():
        kind = type(p).__name__
        if kind in ("DTensor", "FlatParameter") or hasattr(p, "ds_id"):
            raise ConfigError(f"parameter {name!r} is sharded ({'DeepSpeed ZeRO' if hasattr(p, 'ds_id') else kind}): "
                              f"{what} trains whole weights in place and does not support FSDP or DeepSpeed ZeRO")


def check_runtime(model: nn.Module | None, slots) -> None:
    """Per step: no sharding launched since attaching, and no lone process of a multi-process launch."""
    kind = _accelerate_distributed_type()
    if kind in _UNSUPPORTED_TYPES:
        raise ConfigError(f"SaRAAdamW does not support Accelerate's distributed_type={kind} (it shards or replaces "
                          "the weights SaRA trains in place); use plain data parallelism (--multi_gpu)")
    _check_accelerate_shards_data()
    if launched_world_size() > 1 and world_size() == 1:
        raise ConfigError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but torch.distributed is not initialised: each process "
            "would train on its own data. Call torch.distributed.init_process_group(...) (or create the "
            "Accelerator) before training.")
    if model is not None and slots:
        owned = dict(model.named_parameters())
        for slot in slots:
            if owned.get(slot.name) is not slot.param:
                raise ConfigError(
                    f"the model's parameter {slot.name!r} is no longer the tensor SaRA attached to (FSDP, "
                    "DeepSpeed, load_state_dict(assign=True) or to_empty() replaced it): SaRA would train a "
                    "detached copy. Attach SaRAAdamW after such wrapping or loading, or use plain data "
                    "parallelism.")


# ------------------------------------------------------------------ living inside DDP


def _active_ddp_wrapper():
    """The DistributedDataParallel whose forward is running now, if any (torch records it)."""
    ddp = getattr(sys.modules.get("torch.nn.parallel.distributed"), "DistributedDataParallel", None)
    return getattr(ddp, "_active_ddp_module", None)


class DDPCompanion:
    """What lets DistributedDataParallel wrap a SaRA model without touching SaRA's weights.

    * SaRA's weights go on DDP's ignore list (``model._ddp_params_and_buffers_to_ignore``,
      read by ``DistributedDataParallel.__init__``): no dense buckets, no dense all-reduce.
    * DDP refuses a model with nothing else to train ("DistributedDataParallel is not
      needed ..."), and ``accelerator.prepare`` always wraps on several CPU processes.
      So one small parameter SaRA does not train (the *anchor*) requires grad until
      the first forward pass, then stops: DDP is built, its reducer never receives a
      gradient, and an iteration without any gradient is one DDP has nothing to
      finish. (With no untrained parameter at all there is no anchor, and wrapping
      in DDP fails loudly in DDP.)
    * At every forward it notes the DDP wrapper running it, so SaRA follows
      ``ddp_model.no_sync()`` (what ``accelerator.accumulate`` uses).
    """

    def __init__(self, model: nn.Module, trained_names, sync):
        trained = set(trained_names)
        self.model_dict = model.__dict__
        self.model_ref = weakref.ref(model)
        self.trained_ids = {id(p) for n, p in model.named_parameters() if n in trained}
        # A tied weight has several names; DDP builds its buckets from every one of them, so ignore them all.
        every_name = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in self.trained_ids]
        current = list(model.__dict__.get(_IGNORE_ATTR) or [])
        self.added = [n for n in every_name if n not in current]
        model.__dict__[_IGNORE_ATTR] = current + self.added
        self.checked = set()  # ids of the DDP wrappers already checked
        spare = [(p.numel(), n, p) for n, p in model.named_parameters() if n not in trained]
        self.anchor = min(spare, key=lambda t: t[:2])[2] if spare else None
        self.keep_anchor()
        self.sync = sync
        self.handle = model.register_forward_pre_hook(self._before_forward)

    def keep_anchor(self) -> None:
        """Until the first forward pass the anchor requires grad (something may have reset the flags)."""
        if self.anchor is not None:
            self.anchor.requires_grad_(True)

    def _before_forward(self, module, args):
        self.sync.ddp = _active_ddp_wrapper()
        if self.sync.ddp is not None and id(self.sync.ddp) not in self.checked:
            self._check_wrapper(self.sync.ddp)
            self.checked.add(id(self.sync.ddp))
        if self.anchor is not None and torch.is_grad_enabled():
            self.anchor.requires_grad_(False)  # DDP is built by now; it must never wait for this gradient
            self.anchor = None

    def _check_wrapper(self, ddp) -> None:
        """Refuse, at the first forward pass, a DDP wrapper whose reducer would average SaRA's weights.

        DDP reads the names to leave alone once, when it is built, and only from
        the module it wraps: wrapped before SaRA attached, or wrapping a parent of
        the module SaRA attached to, it holds dense buckets for SaRA's weights and
        its backward would fail on their :class:`SelectedGrad` deep in its reducer.
        """
        reduced = [n for n, p in ddp.module.named_parameters(remove_duplicate=False)
                   if id(p) in self.trained_ids and n not in ddp.parameters_to_ignore]
        if not reduced:
            return
        model = self.model_ref()
        inside = [n for n, m in ddp.module.named_modules() if m is model]
        if ddp.module is model:
            cause = "DistributedDataParallel wrapped this model before SaRAAdamW attached to it"
            fix = ("Create the optimizer on the bare model first, then wrap: optimizer = SaRAAdamW(model, ...); "
                   "ddp_model = DistributedDataParallel(model) (with Accelerate: before accelerator.prepare(...))")
        elif inside:
            cause = (f"DistributedDataParallel wraps a {type(ddp.module).__name__} that contains the module SaRA "
                     f"attached to (at {inside[0]!r}); DDP reads the weights to leave alone only from the module "
                     "it wraps")
            fix = (f"Wrap the module SaRA attached to (DistributedDataParallel(parent.{inside[0]})), or attach "
                   "SaRAAdamW to the module you wrap, before wrapping it")
        else:
            cause = "DistributedDataParallel wraps only part of the model SaRA attached to"
            fix = "Attach SaRAAdamW to the module you wrap, before wrapping it"
        more = f" and {len(reduced) - 3} more" if len(reduced) > 3 else ""
        raise ConfigError(
            f"{cause}: its reducer would average SaRA's trained weights ({', '.join(reduced[:3])}{more}) as dense "
            f"gradients, which SaRA never creates (each one's .grad is a SelectedGrad). {fix}.")

    def remove(self) -> None:
        self.handle.remove()
        current = [n for n in (self.model_dict.get(_IGNORE_ATTR) or []) if n not in set(self.added)]
        if current:
            self.model_dict[_IGNORE_ATTR] = current
        else:
            self.model_dict.pop(_IGNORE_ATTR, None)
        self.sync.ddp = None


# ------------------------------------------------------------------ the synchronisation


class GradientSync:
    """All-reduces SaRA's selected gradients across processes (a no-op on one process).

    ``slots`` is the optimizer's list of weights (name, param, idx, values). After
    a backward pass outside :meth:`no_sync` the gathered gradients are averaged in
    place at the end of the pass, so ``p.grad`` (a :class:`SelectedGrad`) and the
    optimizer hold the global gradient. ``bytes_communicated`` and
    ``collectives`` count what was passed to ``torch.distributed.all_reduce``.
    """

    def __init__(self, slots, fingerprint=None, bucket_bytes: int = BUCKET_BYTES):
        self.slots = slots
        self.fingerprint = fingerprint  # () -> float64 vector that must agree across ranks
        self.bucket_bytes = int(bucket_bytes)
        self.enabled = True
        self.pending = False  # local gradients added since the last reduction
        self.verified = False
        self.bytes_communicated = 0
        self.collectives = 0
        self.ddp = None  # the DistributedDataParallel wrapper of the last forward pass, if any
        self._queued_task = None

    @property
    def active(self) -> bool:
        return world_size() > 1

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate locally (as DDP's ``no_sync``)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def gathered(self) -> None:
        """Called by each weight's hook during backward: schedule one reduction at the end of the pass."""
        if not self.active:
            return
        self.pending = True
        if not self.enabled or (self.ddp is not None and not self.ddp.require_backward_grad_sync):
            return
        task = torch._C._current_graph_task_id()
        if task != self._queued_task:
            self._queued_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self.reduce)

    def guard(self) -> None:
        """Before a norm of ``p.grad`` is taken: it must be the synchronised gradient."""
        if self.pending and self.active:
            raise ConfigError(
                "the gradient norm was taken after a backward pass inside no_sync(): SaRA's gradients are not yet "
                "averaged across processes, so each process would clip differently. Clip after the backward pass "
                "that synchronises (with Accelerate: inside `if accelerator.sync_gradients:`).")

    def finish(self) -> None:
        """Before ``step()``: reduce what the last backward passes accumulated inside no_sync()."""
        if self.pending and self.active:
            self.reduce()

    def _all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        dist = torch.distributed
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
        self.bytes_communicated += tensor.numel() * tensor.element_size()
        self.collectives += 1

    def _verify_same_weights(self, device) -> None:
        if self.fingerprint is None:
            return
        dist = torch.distributed
        mine = self.fingerprint().to(device)
        low, high = mine.clone(), mine.clone()
        self._all_reduce(low, dist.ReduceOp.MIN)
        self._all_reduce(high, dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise ConfigError(
                "the processes attached SaRA to different weights or selections: every rank must load the same "
                "pretrained weights (same seed for random ones) and use the same SaRA settings before creating "
                "the optimizer")

    @torch.no_grad()
    def reduce(self) -> None:
        """Average every weight's selected gradient over the processes, in place."""
        self._queued_task = None
        self.pending = False
        live = [s for s in self.slots if s.count]
        if not live:
            return
        device = live[0].values.device
        if not self.verified:
            self._verify_same_weights(device)
            self.verified = True
        world = world_size()
        here = [isinstance(s.param.grad, SelectedGrad) for s in live]
        present = torch.tensor(here, dtype=torch.float32, device=device)
        self._all_reduce(present)  # which weights got a gradient on some process
        grads = [s.param.grad.values if h else torch.zeros(s.count, dtype=s.values.dtype, device=device)
                 for s, h in zip(live, here)]
        for bucket in self._buckets(grads):
            flat = torch.cat([grads[i] for i in bucket]).div_(world)  # pre-divide, as DDP does
            self._all_reduce(flat)
            for i, part in zip(bucket, flat.split([grads[i].numel() for i in bucket])):
                grads[i].copy_(part)
        for slot, h, g, anywhere in zip(live, here, grads, present.tolist()):
            if not h and anywhere > 0:  # no gradient here, some elsewhere: this rank contributed zeros
                slot.param.grad = SelectedGrad(slot.param.shape, slot.grad_positions, g, slot.name, self.guard)
                slot.values.grad = g
                slot.payload = g

    def _buckets(self, grads):
        """Consecutive groups of the same dtype and device, each at most ``bucket_bytes`` (or one tensor)."""
        bucket, size, key = [], 0, None
        for i, g in enumerate(grads):
            nbytes = g.numel() * g.element_size()
            k = (g.dtype, g.device)
            if bucket and (k != key or size + nbytes > self.bucket_bytes):
                yield bucket
                bucket, size = [], 0
            bucket.append(i)
            size += nbytes
            key = k
        if bucket:
            yield bucket

    def bytes_per_sync(self) -> int:
        """What one synchronisation passes to all_reduce now (flags + selected values; the first adds a check)."""
        live = [s for s in self.slots if s.count]
        return 4 * len(live) + sum(s.count * s.values.element_size() for s in live)
