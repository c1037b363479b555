"""The one block-by-block calibration engine (pruning, and later reconstruction).

Wanda, SparseGPT and layer-wise reconstruction all need the activations entering each
decoder block. Following the SparseGPT/Wanda references, the engine

1. runs the embeddings on the calibration windows and catches the inputs of block 0
   (hidden states plus the keyword arguments transformers 5 passes to a decoder layer:
   rotary `position_embeddings`, `attention_mask`, `position_ids`, ...; `use_cache` off),
2. for each block in order: moves the block to the device, hands it and its inputs to a
   callback (which may hook the block and run it, modify it, or run other modules on the
   same inputs), then
3. feeds the inputs through the block *as the callback left it* (the pruned block) to
   get the next block's inputs, and moves the block back to the host.

Only the current block lives on the device; the rest of the model stays on the host.
The calibration activations are kept as `perp_cli.activations` places them: on the
device by default; `offload=True` keeps them on the host, moving one micro-batch at a
time to the device (slower, but device memory then holds only one block and one
micro-batch); `offload=Placement(...)` caps the device share and can spill to disk
(`--max-memory`, `--offload-dir`).

The keyword arguments are caught once from a batch of one window, so their tensors
(causal mask, rotary tables, position ids) broadcast over any micro-batch size; all
calibration windows have the same length and no padding, which makes this exact.

Example (what `perp reconstruct` needs: hook a block, run a dense copy on the same
inputs, change the block, let the engine propagate through the changed block)::

    from perp_cli import engine

    def step(s: engine.BlockStep) -> None:
        s.status("collecting")
        seen = []
        handle = s.block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
        s.inputs.run(s.block, keep_outputs=False)        # (a) hooks see every micro-batch
        handle.remove()
        dense = dense_blocks[s.index].to(s.device)
        targets = s.inputs.run(dense)                      # (c) any module, same inputs
        dense.to("cpu")
        for x, y in zip(s.inputs.batches(), targets):     # (b) modify the block
            loss = (s.inputs.call(s.block, x) - y.to(s.device)).pow(2).mean()
            ...
        # returning None: the engine computes the next inputs through s.block

    final = engine.calibrate(model, tokens, step, device="cpu", batch_size=8)

A callback that already computed the next block's inputs (for instance while training)
may return them as a `BlockInputs` (`s.inputs.replaced(outputs)`) to skip the extra pass.

Models larger than memory (`perp_cli.streaming`) pass a `Residency`: the model is a
skeleton on the meta device, `outside()` materialises the embeddings while block 0's
inputs are caught, `load(i, block)` reads block i from the shards just before its step
and `release(i, block)` writes and frees it right after the propagation, so one block's
weights are in memory at a time. `in_place=True` replaces each micro-batch of inputs by
the block's output as soon as it is computed (one copy of the activations instead of
two), for callbacks that do not keep `s.inputs`. `run_blocks(model, None, step)` is the
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
    """Raised by the pre-hook on block 0 to stop the model forward after the embeddings."""


class StopBlock(Exception):
    """Raised by a hook once a statistics pass has everything it needs from the current
    micro-batch (`perp_cli.pruning.statistics.collecting`: every matrix input seen):
    `BlockInputs.run(keep_outputs=False)` skips the rest of that block forward (for a
    decoder block, its last matrix, whose output no statistic reads)."""


def _to(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples/lists/dicts) to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 returns a tensor, older a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockInputs:
    """Calibration activations entering one block, in micro-batches.

    `hidden` holds the `[b, seqlen, hidden]` micro-batches wherever the run's placement
    put them (device, host or disk); `args`/`kwargs` are the extra arguments every block
    is called with, kept on `device`.
    """

    hidden: ActivationStore
    args: tuple
    kwargs: dict[str, Any]
    device: torch.device
    # (args, kwargs) for micro-batches of b windows where the one-window ones do not
    # broadcast (BLOOM folds the batch into its ALiBi bias, `[b * heads, 1, seqlen]`)
    by_size: dict[int, tuple[tuple, dict[str, Any]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_windows(self) -> int:
        return sum(self.hidden.shape(k)[0] for k in range(len(self.hidden)))

    @property
    def num_tokens(self) -> int:
        return sum(self.hidden.shape(k)[0] * self.hidden.shape(k)[1] for k in range(len(self.hidden)))

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
        args, kwargs = self.by_size.get(x.shape[0], (self.args, self.kwargs))
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
        """The same call arguments with new hidden states (the next block's inputs)."""
        return BlockInputs(ActivationStore.of(hidden, like=self.hidden), self.args, self.kwargs, self.device, self.by_size)

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
    prefix = arch.spec_for(model).blocks + "."
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


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    tokens: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    offload: "bool | Placement | ActivationStore" = False,
) -> BlockInputs:
    """The inputs of block 0 for every calibration window of `tokens` `[n, seqlen]`.

    A forward pre-hook on block 0 records its arguments and aborts the forward, so only
    the embeddings run. The call arguments are taken from a one-window batch so that
    they broadcast over micro-batches of any size. `offload`: see the module docstring;
    a (typically empty) `ActivationStore` means "placed like this store, sharing its
    device budget" (two activation streams of one run, as in reconstruction).
    """
    device = torch.device(device)
    hidden = offload.empty_like() if isinstance(offload, ActivationStore) else ActivationStore(Placement.of(device, offload))
    first = arch.blocks(model)[0]
    caught: dict[str, Any] = {}

    def catch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if args:
            caught["hidden"], caught["args"] = args[0], args[1:]
        else:
            caught["hidden"], caught["args"] = kwargs.pop("hidden_states"), ()
        caught["kwargs"] = dict(kwargs)
        raise _Caught

    def embed(batch: torch.Tensor) -> dict[str, Any]:
        caught.clear()
        try:
            model(input_ids=batch.to(device), use_cache=False)
        except _Caught:
            pass
        if "hidden" not in caught:
            raise RuntimeError("the model forward never reached its first decoder block")
        return dict(caught)

    def call_arguments(caught_call: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = {k: v for k, v in caught_call["kwargs"].items() if k not in ("cache", "past_key_values", "past_key_value")}
        if _accepts(first, "use_cache"):  # GPT-1's Block takes no such argument
            kwargs["use_cache"] = False
        args = tuple(None if isinstance(a, torch.nn.Module) or type(a).__name__.endswith("Cache") else a for a in caught_call["args"])
        return _to(args, device), _to(kwargs, device)

    by_size: dict[int, tuple[tuple, dict[str, Any]]] = {}
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with _outside_blocks_on(model, device):
            one = embed(tokens[:1])
            for i in range(0, tokens.shape[0], batch_size):
                this = embed(tokens[i : i + batch_size])
                hidden.append(this["hidden"])
                b = this["hidden"].shape[0]
                if b not in by_size and not _broadcasts(one, this):
                    by_size[b] = call_arguments(this)
    finally:
        handle.remove()
    args, kwargs = call_arguments(one)
    return BlockInputs(hidden, args, kwargs, device, by_size)


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


def run_blocks(
    model: nn.Module,
    inputs: BlockInputs | None,
    step: StepFn,
    progress: Any = None,
    description: str = "blocks",
    residency: Residency | None = None,
    in_place: bool = False,
) -> BlockInputs | None:
    """Call `step` on every block in order and propagate the inputs through each block
    after `step` returns (or take the inputs `step` returned). Returns the outputs of the
    last block. `progress` is an optional Rich `Progress` showing one bar over blocks.

    `inputs=None` is a data-free pass (each block on the host, nothing propagated);
    `residency` loads each block before its step and releases it after; `in_place`
    propagates with `BlockInputs.propagate_in_place`.
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
        home = next(block.parameters()).device
        device = inputs.device if inputs is not None else home
        block.to(device)
        try:
            status(f"block {index}")
            returned = step(BlockStep(index, block, inputs, device, status))
            if inputs is not None:
                status(f"block {index}: propagating")
                if returned is not None:
                    inputs = returned
                else:
                    inputs = inputs.propagate_in_place(block) if in_place else inputs.propagate(block)
        finally:
            block.to(home)
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
) -> BlockInputs:
    """`capture_inputs` then `run_blocks`: the whole block-sequential pass."""
    was_training = model.training
    model.eval()
    try:
        with residency.outside() if residency is not None else contextlib.nullcontext():
            inputs = capture_inputs(model, tokens, device=device, batch_size=batch_size, offload=offload)
        return run_blocks(model, inputs, step, progress=progress, description=description, residency=residency, in_place=in_place)
    finally:
        model.train(was_training)
