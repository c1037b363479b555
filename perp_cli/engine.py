"""The one block-by-block engine (pruning, reconstruction, shrinking, merging).

Wanda, SparseGPT and layer-wise reconstruction all need the activations entering each
decoder block. Following the SparseGPT/Wanda references, the engine

1. runs the embeddings on the calibration windows and catches the inputs of block 0
   (hidden states), and the arguments the model passes to *each* decoder block besides
   them (what transformers 5 passes to a decoder layer: rotary `position_embeddings`,
   `attention_mask`, `position_ids`, ...; `use_cache` off),
2. for each block in order: moves the block to the device, hands it and its inputs
   (bound to that block's own arguments) to a callback (which may hook the block and run
   it, modify it, or run other modules on the same inputs), then
3. feeds the inputs through the block *as the callback left it* (the pruned block) to
   get the next block's inputs (after the last block only for callers that read its
   outputs: `propagate_last`), and moves the block back to the host.

Only the current block lives on the device; the rest of the model stays on the host.
The calibration activations are kept as `perp_cli.activations` places them: on the
device by default; `offload=True` keeps them on the host, moving one micro-batch at a
time to the device (slower, but device memory then holds only one block and one
micro-batch); `offload=Placement(...)` caps the device share and can spill to disk
(`--max-memory`, `--offload-dir`).

The arguments differ per block in many models: sliding-window vs full attention layers
get different masks (Gemma 2/3, gpt-oss, Cohere 2, Qwen2/3 with mixed `layer_types`),
chunked vs full (Llama 4), local vs global rotary tables (Gemma 3). They are caught by
one forward of a one-window batch in which every block's forward is replaced by a
stand-in that records its call and passes its hidden input on (no block runs, so no
block weight is needed: this works on a streamed skeleton). Tensors equal across blocks
are kept once (most blocks share one mask and one rotary table). Being caught from one
window, they broadcast over any micro-batch size (all calibration windows have the same
length and no padding, which makes this exact); where they do not (BLOOM folds the
batch into its ALiBi bias), each micro-batch size gets its own (`BlockCall.by_size`).
`run_blocks` hands block i's step `inputs.at(i)`: its hidden states with block i's
arguments, so `s.inputs.call/run/propagate` call the block as the model would. (An
argument a model computed from the previous block's *output* would be caught from
unchanged hidden states instead; the per-layer masks and rotary tables do not depend on
them.)

Example (what `perp reconstruct` needs: hook a block, run a dense copy on the same
inputs, change the block, let the engine propagate through the changed block)::

    from perp_cli import engine

    def step(s: engine.BlockStep) -> None:
        s.status("collecting")
        seen = []
        handle = s.block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
        s.inputs.run(s.block, keep_outputs=False)        # (a) hooks see every micro-batch
        handle.remove()
        with engine.on_device(dense_blocks[s.index], s.device):  # (c) any module, same inputs
            targets = s.inputs.run(dense_blocks[s.index])
        for x, y in zip(s.inputs.batches(), targets):     # (b) modify the block
            loss = (s.inputs.call(s.block, x) - y.to(s.device)).pow(2).mean()
            ...
        # returning None: the engine computes the next inputs through s.block

    final = engine.calibrate(model, tokens, step, device="cpu", batch_size=8)

A callback that already computed the next block's inputs (for instance while training)
may return them as a `BlockInputs` (`s.inputs.replaced(outputs)`) to skip the extra pass.

Models larger than memory (`perp_cli.streaming`) pass a `Residency`: the model is a
skeleton on the meta device, `outside()` materialises the embeddings while block 0's
inputs and every block's arguments are caught, `load(i, block)` reads block i from the
shards just before its step and `release(i, block)` writes and frees it right after the
propagation, so one block's weights are in memory at a time. `in_place=True` replaces
each micro-batch of inputs by the block's output as soon as it is computed (one copy of
the activations instead of two), for callbacks that do not keep `s.inputs`. `run_blocks(model, None, step)` is the
data-free pass: each block in turn, no activations.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from perp_cli import arch
from perp_cli.activations import ActivationStore, Placement


class _Caught(Exception):
    """Raised by a stand-in block to stop the model forward once the wanted calls are caught."""


class StopBlock(Exception):
    """Raised by a hook once a statistics pass has everything it needs from the current
    micro-batch (`perp_cli.pruning.statistics.collecting`: every matrix input seen):
    `BlockInputs.run(keep_outputs=False)` skips the rest of that block forward (for a
    decoder block, its last matrix, whose output no statistic reads)."""


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 returns a tensor, older a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockCall:
    """The extra arguments the model's own forward passes to one decoder block (besides
    its hidden states), kept on the compute device: caught from a one-window batch, and
    `by_size[b]` for micro-batches of b windows where those do not broadcast (BLOOM folds
    the batch into its ALiBi bias, `[b * heads, 1, seqlen]`)."""

    args: tuple
    kwargs: dict[str, Any]
    by_size: dict[int, tuple[tuple, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class BlockInputs:
    """Calibration activations entering one block, in micro-batches.

    `hidden` holds the `[b, seqlen, hidden]` micro-batches wherever the run's placement
    put them (device, host or disk); `calls` every block's own call arguments, kept on
    `device` (sliding and full attention layers get different masks). Block `index` is
    called with `calls[index]` (`arguments`); `at(i)` binds block i's, and `run_blocks`
    binds each step's block before calling the step.
    """

    hidden: ActivationStore
    device: torch.device
    calls: tuple[BlockCall, ...]  # per block of the model
    index: int = 0

    @property
    def arguments(self) -> BlockCall:
        return self.calls[self.index]

    def at(self, index: int, calls: tuple[BlockCall, ...] = ()) -> "BlockInputs":
        """The same hidden states with block `index`'s call arguments: this model's, or
        those in `calls` (another model's, `capture_calls`, for running its blocks here)."""
        return BlockInputs(self.hidden, self.device, calls or self.calls, index)

    def __len__(self) -> int:
        return len(self.hidden)

    def tokens_in(self, k: int) -> int:
        """Tokens in micro-batch k."""
        shape = self.hidden.shape(k)
        return shape[0] * shape[1]

    def new_store(self) -> ActivationStore:
        """An empty store for activations of this run (targets, outputs): same placement,
        same device budget."""
        return self.hidden.empty_like()

    def batch(self, k: int) -> torch.Tensor:
        """Micro-batch k of hidden states, on the compute device."""
        return self.hidden[k].to(self.device)

    def batches(self) -> Iterator[torch.Tensor]:
        """Each micro-batch of hidden states, on the compute device."""
        for k in range(len(self.hidden)):
            yield self.batch(k)

    def call(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run a decoder block (or a copy of one) on one micro-batch `x`."""
        call = self.arguments
        args, kwargs = call.by_size.get(x.shape[0], (call.args, call.kwargs))
        return _hidden(module(x, *args, **kwargs))

    @torch.no_grad()
    def run(self, module: nn.Module, keep_outputs: bool = True) -> ActivationStore:
        """Run `module` over every micro-batch; the outputs (placed like the inputs) if
        `keep_outputs`.

        With `keep_outputs=False` this is the statistics pass: forward hooks registered
        on submodules see all calibration tokens, and nothing is kept; a hook may raise
        `StopBlock` once it has what it needs from a micro-batch.
        """
        outputs = self.new_store()
        for x in self.batches():
            try:
                y = self.call(module, x)
            except StopBlock:
                if keep_outputs:  # outputs were asked for: a hook must not cut the forward short
                    raise
                continue
            if keep_outputs:
                outputs.append(y)
        return outputs

    def replaced(self, hidden: "ActivationStore | list[torch.Tensor]") -> "BlockInputs":
        """The same call arguments (still block `index`'s) with new hidden states (the
        next block's inputs: `run_blocks` binds the next block's arguments)."""
        return BlockInputs(ActivationStore.of(hidden, like=self.hidden), self.device, self.calls, self.index)

    def propagate(self, module: nn.Module) -> "BlockInputs":
        """The inputs of the next block: `module` applied to these inputs."""
        return self.replaced(self.run(module))

    @torch.no_grad()
    def propagate_in_place(self, module: nn.Module) -> "BlockInputs":
        """`propagate`, overwriting each micro-batch with its output as soon as it exists.

        Same numbers, half the activation memory (inputs and outputs never coexist);
        these inputs are gone afterwards, so only for callers that do not keep them.
        """
        for k in range(len(self.hidden)):
            x = self.batch(k)
            self.hidden[k] = self.call(module, x)
            del x
        return self


@dataclass
class BlockStep:
    """What a callback gets for block `index`: the block (already on `device`), its
    inputs (None in a data-free pass), and `status(text)` to show what it is doing in
    the progress bar."""

    index: int
    block: nn.Module
    inputs: BlockInputs | None
    device: torch.device
    status: Callable[[str], None]


StepFn = Callable[[BlockStep], "BlockInputs | None"]
BlockHook = Callable[[int, nn.Module], None]


@dataclass
class Residency:
    """How the weights of a model that is not all in memory come and go (streaming).

    `outside()` is a context during which the weights outside the blocks that embed the
    tokens are present (block 0's inputs are caught inside it); `load(i, block)` puts
    block i's weights on the host before its step; `release(i, block)` takes them away
    after the step and the propagation (perp_cli.streaming writes them to the output).
    """

    load: BlockHook
    release: BlockHook
    outside: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Temporarily move every parameter and buffer outside the blocks to `device`
    (embeddings, rotary tables, final norm, lm_head), leaving the blocks on the host."""
    prefix = arch.block_prefix(model)
    moved: list[tuple[torch.Tensor, torch.device]] = []
    seen: set[int] = set()
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if name.startswith(prefix) or id(t) in seen or t.device == device or t.is_meta:
            continue  # meta: a streamed weight the embedding pass does not need
        seen.add(id(t))
        moved.append((t, t.device))
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, home in moved:
            t.data = t.data.to(home)


# What a stand-in block returns. Transformers 5 decoder layers return the hidden states;
# some still return a tuple whose first item they are (BLOOM, Falcon, GPT-Neo, MPT in
# transformers 5.24; older remote code). The model's forward then indexes `[0]`, which on
# a tensor silently takes a slice, so each form is tried until every block sees a hidden
# input of the same shape.
_OUTPUT_FORMS = ("tensor", "1-tuple", "2-tuple", "3-tuple")


def _block_output(hidden: Any, form: str) -> Any:
    if form == "tensor":
        return hidden
    return (hidden,) + (None,) * (int(form[0]) - 1)


@contextlib.contextmanager
def _stand_ins(blocks: list[nn.Module], form: str, stop_after: int) -> Iterator[list[dict[str, Any] | None]]:
    """Replace each block's forward by a stand-in that records its call (hidden states,
    args, kwargs) and returns its hidden input unchanged; the model forward is stopped
    (`_Caught`) once `stop_after` blocks were called. No block weight is read, so this
    runs on a streamed skeleton whose blocks are still on the meta device."""
    calls: list[dict[str, Any] | None] = [None] * len(blocks)

    def stand_in(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                hidden, rest = args[0], args[1:]
            else:
                hidden, rest = kwargs.pop("hidden_states", None), ()
            if calls[i] is None:
                calls[i] = {"hidden": hidden, "args": rest, "kwargs": dict(kwargs)}
            if sum(c is not None for c in calls) >= stop_after:
                raise _Caught
            return _block_output(hidden, form)
        return forward

    saved = [vars(b).get("forward") for b in blocks]  # an instance-level forward (accelerate hooks) comes back
    for i, b in enumerate(blocks):
        b.forward = stand_in(i)
    try:
        yield calls
    finally:
        for b, forward in zip(blocks, saved):
            if forward is None:
                del b.forward
            else:
                b.forward = forward


class _Shared:
    """Moves call arguments to the device once per distinct tensor: blocks given the same
    mask or rotary table (the same object, or equal values) share one copy, so the
    per-block arguments do not grow with depth (most blocks share one mask and one table)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.moved: dict[int, torch.Tensor] = {}
        self.distinct: list[tuple[torch.Tensor, torch.Tensor]] = []  # (original, on the device)
        self.alive: list[torch.Tensor] = []  # every original seen: no id is reused while capturing

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.moved:
            same = (
                m for o, m in self.distinct
                if not t.is_meta and o.shape == t.shape and o.dtype == t.dtype and o.device == t.device and torch.equal(o, t)
            )
            moved = next(same, None)
            if moved is None:
                moved = t.to(self.device)
                self.distinct.append((t, moved))
            self.moved[id(t)] = moved
            self.alive.append(t)
        return self.moved[id(t)]

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    tokens: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    offload: "bool | Placement | ActivationStore" = False,
) -> BlockInputs:
    """The inputs of block 0 for every calibration window of `tokens` `[n, seqlen]`, and
    the call arguments of every block (bound to block 0; `BlockInputs.at(i)`).

    Each block's forward is replaced by a stand-in (`_stand_ins`) that records how the
    model calls it and passes its hidden input on, so one forward of a one-window batch
    gives every block's own arguments (sliding vs full attention masks, local vs global
    rotary tables) without running any block; they broadcast over micro-batches of any
    size, except where a block's do not (`BlockCall.by_size`). For the micro-batches
    themselves the forward stops at block 0, so only the embeddings run. `offload`: see
    the module docstring; a (typically empty) `ActivationStore` means "placed like this
    store, sharing its device budget" (two activation streams of one run, as in
    reconstruction).
    """
    device = torch.device(device)
    hidden = offload.empty_like() if isinstance(offload, ActivationStore) else ActivationStore(Placement.of(device, offload))
    calls = _capture(model, tokens, device, batch_size, hidden)
    return BlockInputs(hidden, device, calls)


@torch.no_grad()
def capture_calls(
    model: nn.Module, tokens: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 8
) -> tuple[BlockCall, ...]:
    """Every block's call arguments for `tokens` in micro-batches of `batch_size`, as
    `capture_inputs` catches them, without the activations (for running another model's
    blocks on these inputs: `inputs.at(i, calls)`)."""
    return _capture(model, tokens, torch.device(device), batch_size, None)


def _capture(
    model: nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int, hidden: ActivationStore | None
) -> tuple[BlockCall, ...]:
    """`capture_inputs`' work: every block's `BlockCall`, and block 0's inputs appended
    to `hidden` (None: only the calls, one forward per micro-batch size)."""
    blocks = list(arch.blocks(model))

    def forward(batch: torch.Tensor, form: str, stop_after: int) -> list[dict[str, Any] | None]:
        with _stand_ins(blocks, form, stop_after) as calls:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Caught:
                pass
        if calls[0] is None:
            raise RuntimeError("the model forward never reached its first decoder block")
        return calls

    def consistent(calls: list[dict[str, Any] | None]) -> bool:
        """Every block called, each with a hidden input shaped like block 0's."""
        shape = calls[0]["hidden"].shape if isinstance(calls[0]["hidden"], torch.Tensor) else None
        return shape is not None and all(
            c is not None and isinstance(c["hidden"], torch.Tensor) and c["hidden"].shape == shape for c in calls
        )

    def every_block(batch: torch.Tensor, form: str | None) -> tuple[list[dict[str, Any]], str]:
        """Each block's call on `batch`, with the stand-in output form the model expects
        (found on the first batch: the first form under which every block is reached
        with a hidden input of the right shape)."""
        failures: list[BaseException] = []
        for candidate in _OUTPUT_FORMS if form is None else (form,):
            try:
                calls = forward(batch, candidate, len(blocks))
            except Exception as exc:  # a wrong form can break the model's code between blocks
                failures.append(exc)
                continue
            if consistent(calls):
                return calls, candidate  # type: ignore[return-value]
        if failures:
            raise failures[0]
        missing = [i for i, c in enumerate(calls) if c is None]
        raise RuntimeError(
            f"could not catch the call arguments of every decoder block (never called: {missing})" if missing
            else "could not catch the call arguments of every decoder block: their hidden inputs differ in shape"
        )

    share = _Shared(device)

    def call_arguments(block: nn.Module, caught_call: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = {k: v for k, v in caught_call["kwargs"].items() if k not in ("cache", "past_key_values", "past_key_value")}
        if _accepts(block, "use_cache"):  # GPT-1's Block takes no such argument
            kwargs["use_cache"] = False
        args = tuple(None if isinstance(a, torch.nn.Module) or type(a).__name__.endswith("Cache") else a for a in caught_call["args"])
        return share(args), share(kwargs)

    checked = {1}  # micro-batch sizes whose every-block arguments were compared with the one-window ones
    with _outside_blocks_on(model, device):
        one, form = every_block(tokens[:1], None)
        calls = [BlockCall(*call_arguments(b, c)) for b, c in zip(blocks, one)]
        for i in range(0, tokens.shape[0], batch_size):
            batch = tokens[i : i + batch_size]
            if batch.shape[0] in checked:
                if hidden is not None:
                    hidden.append(forward(batch, form, 1)[0]["hidden"])
                continue
            checked.add(batch.shape[0])
            this, _ = every_block(batch, form)
            if hidden is not None:
                hidden.append(this[0]["hidden"])
            for b, call, mine, theirs in zip(blocks, calls, one, this):
                if not _broadcasts(mine, theirs):
                    call.by_size[batch.shape[0]] = call_arguments(b, theirs)
    return tuple(calls)


def _accepts(module: nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _broadcasts(one: dict[str, Any], many: dict[str, Any]) -> bool:
    """Whether every tensor argument of a one-window call broadcasts to the same
    argument of a several-window call (true for causal masks and rotary tables)."""
    def leaves(value: Any) -> list[Any]:
        if isinstance(value, dict):
            return [x for k in sorted(value) for x in leaves(value[k])]
        if isinstance(value, (list, tuple)):
            return [x for v in value for x in leaves(v)]
        return [value]

    for a, b in zip(leaves((one["args"], one["kwargs"])), leaves((many["args"], many["kwargs"]))):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            try:
                if torch.broadcast_shapes(a.shape, b.shape) != b.shape:
                    return False
            except RuntimeError:
                return False
    return True


@contextlib.contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """`block` on `device` for the duration, then back where it was (the engine keeps one
    block at a time on the device)."""
    home = next(block.parameters()).device
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def run_blocks(
    model: nn.Module,
    inputs: BlockInputs | None,
    step: StepFn,
    progress: Any = None,
    description: str = "blocks",
    residency: Residency | None = None,
    in_place: bool = False,
    propagate_last: bool = True,
) -> BlockInputs | None:
    """Call `step` on every block in order and propagate the inputs through each block
    after `step` returns (or take the inputs `step` returned). Returns the outputs of the
    last block. `progress` is an optional Rich `Progress` showing one bar over blocks.

    `inputs=None` is a data-free pass (each block on the host, nothing propagated);
    `residency` loads each block before its step and releases it after; `in_place`
    propagates with `BlockInputs.propagate_in_place`. `propagate_last=False` skips the
    propagation through the last block, for callers that read only what the steps
    produce (pruning, statistics): the returned inputs are then the last block's inputs.
    The references run that pass and discard it; it is one block forward of 2L.
    """
    blocks = arch.blocks(model)
    task = progress.add_task(description, total=len(blocks), status="") if progress is not None else None

    def status(text: str) -> None:
        if progress is not None:
            progress.update(task, status=text)

    for index, block in enumerate(blocks):
        if residency is not None:
            status(f"block {index}: loading")
            residency.load(index, block)
        device = inputs.device if inputs is not None else next(block.parameters()).device
        if inputs is not None:
            inputs = inputs.at(index)  # block i is called with its own arguments (its mask, its rotary table)
        with on_device(block, device):
            status(f"block {index}")
            returned = step(BlockStep(index, block, inputs, device, status))
            if returned is not None:
                inputs = returned
            elif inputs is not None and (propagate_last or index < len(blocks) - 1):
                status(f"block {index}: propagating")
                inputs = inputs.propagate_in_place(block) if in_place else inputs.propagate(block)
        if residency is not None:
            status(f"block {index}: writing")
            residency.release(index, block)
        if progress is not None:
            progress.advance(task)
    status("done")
    return inputs


def calibrate(
    model: nn.Module,
    tokens: torch.Tensor,
    step: StepFn,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    offload: "bool | Placement | ActivationStore" = False,
    progress: Any = None,
    description: str = "blocks",
    residency: Residency | None = None,
    in_place: bool = False,
    propagate_last: bool = True,
) -> BlockInputs:
    """`capture_inputs` then `run_blocks`: the whole block-sequential pass."""
    was_training = model.training
    model.eval()
    try:
        with residency.outside() if residency is not None else contextlib.nullcontext():
            inputs = capture_inputs(model, tokens, device=device, batch_size=batch_size, offload=offload)
        return run_blocks(model, inputs, step, progress=progress, description=description, residency=residency, in_place=in_place,
                          propagate_last=propagate_last)
    finally:
        model.train(was_training)
