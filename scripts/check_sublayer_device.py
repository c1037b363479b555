"""Device check for `perp reconstruct --granularity sublayer`: tiny OPT and LLaMA on CUDA
(float32 and bfloat16; CPU when there is no GPU). Prints each half's error before and after
and whether every mask and masked zero survived.

    python scripts/check_sublayer_device.py
"""
import copy, sys, time
import torch
sys.path.insert(0, ".")
from perp_cli import tiny
from perp_cli.checkpoint import Checkpoint, mask_problems
from perp_cli.manifest import empty_manifest
from perp_cli.pruner import PruneConfig, prune
from perp_cli.reconstruction import ReconstructConfig, reconstruct
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
device = "cuda" if torch.cuda.is_available() else "cpu"
tokens = torch.randint(4, tiny.VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
for fam in ("opt", "llama"):
    for dtype in (torch.float32, torch.bfloat16):
        dense = tiny.build_model(fam, seed=0).to(dtype)
        ckpt = Checkpoint(copy.deepcopy(dense), None, None, empty_manifest("dense"), "pruned")
        masks, _, _ = prune(ckpt, PruneConfig("wanda", sparsity=0.6, seqlen=32, device=device), tokens=tokens)
        ckpt.masks = masks
        before = {n: k.clone() for n, k in masks.masks.items()}
        t = time.time()
        out = reconstruct(ckpt, dense, tokens, ReconstructConfig(granularity="sublayer", device=device, steps_per_block=12, batch_size=4, lr=3e-3,
                                                                 train="norms" if fam == "llama" else "biases,norms"))
        ok = mask_problems(ckpt.model, ckpt.masks) == [] and all(torch.equal(before[n], k) for n, k in ckpt.masks.masks.items())
        print(fam, dtype, f"{time.time()-t:.1f}s", "masks ok" if ok else "MASKS BROKEN",
              [(b.block, b.part, f"{b.mse_before:.3g}->{b.mse_after:.3g}", b.restored) for b in out.blocks])
