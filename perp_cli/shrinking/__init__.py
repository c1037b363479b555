"""`shrink(ckpt, config)`: structured pruning, the library behind `perp shrink`.

Unstructured and N:M sparsity keep the dense shapes, so most runtimes run the pruned
model at the dense model's size and speed. Structured pruning removes whole parts and
writes a *smaller dense model*: plain `AutoModelForCausalLM.from_pretrained` loads it,
every runtime runs it faster, and PERP's recovery (`retrain`, `reconstruct`) applies to
it unchanged, with LoRA merging freely because no weight has to stay zero.

One structure per run, scored on calibration windows with the shared block engine:

* `depth`   (`depth.py`):   whole blocks, by block influence (ShortGPT);
* `width`   (`width.py`):   MLP intermediate channels, by their output contribution;
* `heads`   (`heads.py`):   attention key-value groups, by their output contribution;
* `experts` (`experts.py`): routed experts, by REAP-style saliency.

Each ends in a `surgery.Surgery` that `surgery.apply` turns into the smaller model, built
from the smaller config (so the config is right by construction). What was removed, the
scores, and the parameter counts before and after go into the step's results.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from perp_cli import activations, arch, checkpoint, data, engine, memory
from perp_cli.checkpoint import Checkpoint
from perp_cli.errors import UsageError
from perp_cli.manifest import peak_memory
from perp_cli.progress import make_progress
from perp_cli.shrinking import depth as depth_mod
from perp_cli.shrinking import experts as experts_mod
from perp_cli.shrinking import heads as heads_mod
from perp_cli.shrinking import layout, surgery
from perp_cli.shrinking import width as width_mod
from perp_cli.trainable import count_parameters

STRUCTURES = ("depth", "width", "heads", "experts")
# the option that names an explicit count, per structure
COUNT_FLAGS = {"depth": "--remove-blocks", "width": "--remove-channels", "heads": "--remove-heads", "experts": "--remove-experts"}


@dataclass
class ShrinkConfig(data.CalibrationConfig):
    structure: str
    remove_ratio: float | None = None  # of blocks, channels, key-value groups or experts
    remove_count: int | None = None  # blocks, channels, attention heads, experts (per block)
    keep_ratio: float | None = None  # depth only: the fraction of blocks kept
    multiple_of: int = 1  # width: the kept intermediate size is a multiple of this
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8
    offload_activations: bool = False
    quiet: bool = True


class ShrinkOutcome(NamedTuple):
    model: nn.Module  # the smaller model
    results: dict[str, Any]
    data: dict[str, Any]


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def validate(cfg: ShrinkConfig) -> None:
    """Usage errors that need no model."""
    if cfg.structure not in STRUCTURES:
        raise UsageError(f"--structure {cfg.structure!r} is not one of {', '.join(STRUCTURES)}")
    given = [f for f, v in (("--remove-ratio", cfg.remove_ratio), (COUNT_FLAGS[cfg.structure], cfg.remove_count),
                            ("--keep-ratio", cfg.keep_ratio)) if v is not None]
    if cfg.keep_ratio is not None and cfg.structure != "depth":
        raise UsageError("--keep-ratio is for --structure depth (the fraction of blocks kept); use --remove-ratio")
    if len(given) != 1:
        raise UsageError(
            f"--structure {cfg.structure} needs exactly one of --remove-ratio or {COUNT_FLAGS[cfg.structure]}"
            + (" or --keep-ratio" if cfg.structure == "depth" else "") + (f"; got {', '.join(given)}" if given else "")
        )
    for flag, value in (("--remove-ratio", cfg.remove_ratio), ("--keep-ratio", cfg.keep_ratio)):
        if value is not None and not 0.0 < value < 1.0:
            raise UsageError(f"{flag} must be in (0, 1), got {value}")
    if cfg.remove_count is not None and cfg.remove_count < 1:
        raise UsageError(f"{COUNT_FLAGS[cfg.structure]} must be at least 1, got {cfg.remove_count}")
    if cfg.multiple_of < 1:
        raise UsageError(f"--multiple-of must be at least 1, got {cfg.multiple_of}")
    if cfg.multiple_of != 1 and cfg.structure != "width":
        raise UsageError("--multiple-of applies to --structure width (the kept MLP width)")
    if cfg.batch_size < 1 or cfg.nsamples < 1:
        raise UsageError("--batch-size and --nsamples must be at least 1")


def _count(cfg: ShrinkConfig, total: int, unit: str, count: int | None = None) -> int:
    """How many of `total` units to remove; usage errors for nothing or everything."""
    if count is None:
        count = cfg.remove_count
    if cfg.keep_ratio is not None:
        count = total - _round(cfg.keep_ratio * total)
    elif cfg.remove_ratio is not None:
        count = _round(cfg.remove_ratio * total)
    if count < 1:
        raise UsageError(f"that removes no {unit} of {total}; ask for more")
    if count >= total:
        raise UsageError(f"that removes all {total} {unit}s (asked for {count}); at least one must stay")
    return count


def check(model: nn.Module, cfg: ShrinkConfig) -> tuple[dict[int, Any], int]:
    """The layout of every block and how many units go per block; usage errors for
    requests the model cannot satisfy (before any data is read)."""
    n = len(arch.blocks(model))
    if cfg.structure == "depth":
        return {}, _count(cfg, n, "block")
    if cfg.structure == "width":
        plan = {i: layout.channels(model, i) for i in range(n)}
        bare = [i for i, c in plan.items() if c is None]
        if bare:
            raise UsageError(f"block {bare[0]} has no dense MLP (an MoE block); width pruning shrinks dense MLPs: use --structure experts")
        sizes = {c.size for c in plan.values()}
        if len(sizes) != 1:
            raise UsageError(f"the blocks' MLP widths differ ({sorted(sizes)}); width pruning keeps one intermediate size")
        size = sizes.pop()
        layout.intermediate_key(model, size)
        remove = _count(cfg, size, "channel")
        kept = size - remove
        if cfg.multiple_of > 1:
            kept -= kept % cfg.multiple_of
            if kept < 1:
                raise UsageError(f"--multiple-of {cfg.multiple_of} leaves no channel of {size}")
            remove = size - kept
        return plan, remove
    if cfg.structure == "heads":
        plan = {i: layout.heads(model, i) for i in range(n)}
        first = plan[0]
        if cfg.remove_count is not None:
            if cfg.remove_count >= first.heads:
                raise UsageError(f"--remove-heads {cfg.remove_count} removes all {first.heads} attention heads; at least one key-value group must stay")
            if cfg.remove_count % first.group:
                raise UsageError(
                    f"--remove-heads {cfg.remove_count} is not a multiple of {first.group}: with {first.heads} heads in "
                    f"{first.kv_heads} key-value groups, whole groups of {first.group} heads are removed"
                )
            groups = _count(cfg, first.kv_heads, "key-value group", cfg.remove_count // first.group)
        else:
            groups = _count(cfg, first.kv_heads, "key-value group")
        config = heads_mod.surgery(model, {0: first}, {0: list(range(groups))}).config
        surgery.check_config(config, f"removing {groups * first.group} of {first.heads} attention heads")
        return plan, groups
    plan = {i: e for i in range(n) if (e := layout.experts(model, i)) is not None}
    if not plan:
        raise UsageError(f"{arch.spec_for(model).model_type} is a dense model (no routed experts): --structure experts needs an MoE model")
    count = next(iter(plan.values())).count
    remove = _count(cfg, count, "expert")
    top_k = getattr(arch.text_config(model), "num_experts_per_tok", None)
    if isinstance(top_k, int) and count - remove < top_k:
        raise UsageError(f"removing {remove} of {count} experts leaves {count - remove}, fewer than the {top_k} each token is routed to")
    return plan, remove


def shrink(ckpt: Checkpoint, cfg: ShrinkConfig, tokens: data.Windows) -> ShrinkOutcome:
    """Score, choose and cut; `ckpt.model` is modified (zeroed parts) and must not be saved.
    `tokens`: the calibration windows (`data.Windows`)."""
    start = time.perf_counter()
    validate(cfg)
    if ckpt.adapters is not None:
        raise UsageError(f"{ckpt.source} has unmerged adapters; run `perp merge` first")
    if ckpt.masks is not None and len(ckpt.masks):
        raise UsageError(
            f"{ckpt.source} has pruning masks (unstructured or N:M); shrink the dense model, then prune the smaller one"
        )
    model = ckpt.model
    plan, remove = check(model, cfg)
    # the smaller model is built next to the loaded one (at most as large): checked before any work
    memory.require(sum(p.numel() * p.element_size() for p in model.parameters()), "building the smaller model next to the loaded one",
                   "shrink on a machine with room for two copies of the model")
    tokens, data_record = data.calibration_of(tokens)
    device = checkpoint.resolve_device(cfg.device)
    placement = activations.Placement.of(device, cfg.offload_activations)
    before = count_parameters(model)
    n_blocks = len(arch.blocks(model))
    if cfg.structure == "depth":
        worker: Any = depth_mod.Influence(n_blocks)
    elif cfg.structure == "width":
        worker = width_mod.WidthPass(plan, remove)
    elif cfg.structure == "heads":
        worker = heads_mod.HeadsPass(plan, remove)
    else:
        worker = experts_mod.ExpertsPass(plan)
    with make_progress(cfg.quiet) as progress:
        engine.calibrate(model, tokens, worker.step, device=device, batch_size=cfg.batch_size, offload=placement,
                         progress=progress, description=f"{cfg.structure} scores", propagate_last=False)
    model.to("cpu")
    removed: dict[str, Any]
    if cfg.structure == "depth":
        gone = layout.lowest(worker.scores, remove)
        cut = depth_mod.surgery(model, gone)
        removed = {"blocks": gone, "kept_blocks": cut.keep_blocks}
        scores: Any = [round(s, 6) for s in worker.scores]
        sizes = {"num_hidden_layers": [n_blocks, n_blocks - remove]}
    elif cfg.structure == "width":
        cut = width_mod.surgery(model, plan, worker.removed)
        removed = {"channels_per_block": remove, "channels": {str(i): v for i, v in worker.removed.items()}}
        # one number per channel would make perp.json huge on real models: the margin per block
        scores = {str(i): _margin(s, worker.removed[i]) for i, s in worker.scores.items()}
        size = next(iter(plan.values())).size
        sizes = {layout.intermediate_key(model, size): [size, size - remove]}
    elif cfg.structure == "heads":
        cut = heads_mod.surgery(model, plan, worker.removed)
        h = plan[0]
        removed = {"key_value_groups_per_block": remove, "attention_heads_per_block": remove * h.group,
                   "key_value_groups": {str(i): v for i, v in worker.removed.items()}}
        scores = {str(i): [round(float(v), 6) for v in s] for i, s in worker.scores.items()}
        sizes = {"num_attention_heads": [h.heads, h.heads - remove * h.group],
                 "num_key_value_heads": [h.kv_heads, h.kv_heads - remove], "head_dim": [h.head_dim, h.head_dim]}
    else:
        chosen = worker.choose(remove)
        cut = experts_mod.surgery(model, plan, chosen)
        count = next(iter(plan.values())).count
        removed = {"experts_per_block": remove, "experts": {str(i): v for i, v in chosen.items()},
                   "moe_blocks": sorted(plan)}
        scores = {str(i): {"saliency": [round(float(v), 6) for v in worker.scores(i)],
                           "routed_tokens": worker.routed[i].tolist()} for i in plan}
        sizes = {"experts": [count, count - remove]}
    smaller = surgery.apply(model, cut)
    after = count_parameters(smaller)
    results = {
        "structure": cfg.structure,
        "removed": removed,
        "sizes": sizes,
        "scores": scores,
        "score": SCORES[cfg.structure],
        "parameters": {"before": before, "after": after, "removed_fraction": round(1 - after / before, 6)},
        "block_parameters": {"before": surgery.block_parameter_count(model), "after": surgery.block_parameter_count(smaller)},
        "shrink_time_s": round(time.perf_counter() - start, 3),
        "peak_memory": peak_memory(),
    }
    return ShrinkOutcome(smaller, results, data_record)


def _margin(scores: torch.Tensor, removed: list[int]) -> dict[str, float]:
    """The highest score removed and the lowest kept (removed_max <= kept_min)."""
    gone = torch.zeros(scores.numel(), dtype=torch.bool)
    gone[removed] = True
    return {"removed_max": round(float(scores[gone].max()), 6), "kept_min": round(float(scores[~gone].min()), 6)}


SCORES = {
    "depth": "block influence 1 - mean cos(input, output) over calibration tokens (ShortGPT); lowest removed",
    "width": "channel contribution ||a_c||_2 * ||W_out[:, c]||_2 over calibration tokens; lowest removed, blocks in order",
    "heads": "key-value group contribution ||sum_h A_h W_o,h^T||_F over calibration tokens; lowest removed, blocks in order",
    "experts": "REAP-style saliency (1/T) sum_{t routed to e} g_e(t) ||f_e(x_t)||_2 (routing frequency x mean gated output norm)",
}


def shrink_history(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The `shrink` steps a checkpoint went through, oldest first."""
    return [h for h in manifest.get("history", []) if isinstance(h, dict) and h.get("command") == "shrink"]


def source_blocks(manifest: dict[str, Any]) -> list[list[int]] | None:
    """For each block of a shrunk checkpoint, the blocks of the source model it stands
    for (depth pruning: a kept block stands for itself and the removed blocks after it,
    up to the next kept one; the first also for any removed blocks before it). None when
    no block was removed."""
    mapping: list[list[int]] | None = None
    for step in shrink_history(manifest):
        kept = (step.get("results") or {}).get("removed", {}).get("kept_blocks")
        if not kept:
            continue
        total = step["results"]["sizes"]["num_hidden_layers"][0]
        bounds = [0] + kept[1:] + [total]
        segments = [list(range(bounds[j], bounds[j + 1])) for j in range(len(kept))]
        if mapping is not None:  # compose with an earlier depth step
            segments = [[s for i in seg for s in mapping[i]] for seg in segments]
        mapping = segments
    return mapping


def shrunk_manifest(source: str) -> dict[str, Any] | None:
    """The manifest of a local `perp shrink` output that carries no masks (a smaller dense
    model), or None for anything else. Read before loading, so commands can choose."""
    path = Path(source).expanduser()
    if not path.is_dir() or (path / checkpoint.MASKS_NAME).exists():
        return None
    manifest = checkpoint.read_manifest(path)
    return manifest if manifest and shrink_history(manifest) else None


def check_teacher(model: nn.Module, dense: nn.Module, teacher_blocks: list[list[int]] | None) -> None:
    """The dense reference of a shrunk model: the same family and hidden size (blocks read
    and write the same residual stream), and the blocks the shrunk ones stand for."""
    mine, theirs = arch.spec_for(model), arch.spec_for(dense)
    if mine.model_type != theirs.model_type:
        raise UsageError(f"--dense is a {theirs.model_type} model but the shrunk checkpoint is {mine.model_type}")
    if arch.hidden_size(model) != arch.hidden_size(dense):
        raise UsageError(f"--dense has hidden size {arch.hidden_size(dense)}, the shrunk model {arch.hidden_size(model)}: not its source")
    n, n_dense = len(arch.blocks(model)), len(arch.blocks(dense))
    expected = sum(len(seg) for seg in teacher_blocks) if teacher_blocks else n
    if teacher_blocks is not None and len(teacher_blocks) != n:
        raise UsageError(f"the shrunk model has {n} blocks but its perp.json maps {len(teacher_blocks)}; it was edited")
    if n_dense != expected:
        raise UsageError(f"--dense has {n_dense} blocks; the shrunk model's blocks stand for {expected} source blocks: not its source")
