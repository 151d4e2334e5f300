"""First 8 test images, no-AAT model, 1 thread: `strong` (CPU time, mIoU) vs a larger APGD attack (argv: strong | big)."""
import glob, sys, time, torch
from rgbt.dataset import RGBTDataset
from robustness.threats import build_threat
from trainer.checkpoint import load_model
from trainer.metrics import ConfusionMatrix
torch.set_num_threads(1)
model, _ = load_model(sorted(glob.glob('/tmp/atk_runs/clean-*/last.pt'))[-1]); model.requires_grad_(False)
ds = RGBTDataset('/tmp/atk_data', split='test')
items = [ds[j] for j in range(8)]
ir, vis, lab = (torch.stack([it[k] for it in items]) for k in ("ir", "vis", "label"))
big = {"attack": "worst_case", "members": [
    {"attack": "apgd", "eps": "8/255", "steps": 100, "seg_loss": "js", "seed": 100},
    {"attack": "apgd", "eps": "8/255", "steps": 100, "seg_loss": "msl", "seed": 200}]}
which = sys.argv[1]
attack = build_threat("strong" if which == "strong" else big, model)
c0, t0 = time.process_time(), time.time()
a = attack(ir, vis, lab)
cpu, wall = time.process_time() - c0, time.time() - t0
cm = ConfusionMatrix(9)
with torch.no_grad():
    cm.update(model(*a).logits.argmax(1), lab)
r = cm.compute()
print(f"{which} {attack.budget()} on 8 images: mIoU {100*r['miou']:.2f}, pixel acc {100*r['pixel_acc']:.1f}; "
      f"CPU {cpu:.0f} s, wall {wall:.0f} s -> 16 images on one dedicated core ~ {2*cpu/60:.1f} min")
