"""VGG-19 BN head: validation accuracy of one checkpoint with its running BatchNorm statistics,
with batch statistics, and with the statistics computed again on 5,120 clean training images
(dropout on, then off). Usage, from the repository: python bn_stats_diag.py CHECKPOINT"""
import sys, time, torch
from torch import nn
from vggkit.data.datasets import load_dataset
from vggkit.training.checkpoint import model_from_checkpoint
torch.set_num_threads(1)
run = sys.argv[1]
ds = load_dataset("folder:../shared/data/cifar10-jpg.zip", progress=False)
model, _ = model_from_checkpoint(run, "last")
def prep(x): return x.float() / 255.0
xv, yv = prep(ds.x_val[:2000]), ds.y_val[:2000]
g = torch.Generator().manual_seed(0)
idx = torch.randperm(len(ds.y_train), generator=g)[:40 * 128]
xt = prep(ds.x_train[idx])
def acc(mode):
    model.eval()
    if mode == "batch-stats":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm): m.train()
    c = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, 2000, 250):
            c += (model(xv[i:i+250]).argmax(1) == yv[i:i+250]).sum().item()
    return c / 2000
def recalibrate(dropout_on):
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats(); m.momentum = None; m.train()
        if dropout_on and isinstance(m, nn.Dropout): m.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(xt), 128): model(xt[i:i+128])
t = time.time()
print("eval, running stats:", acc("eval"))
print("eval, batch stats, dropout off:", acc("batch-stats"))
recalibrate(dropout_on=True); print("recalibrated with dropout on:", acc("eval"))
recalibrate(dropout_on=False); print("recalibrated with dropout off:", acc("eval"))
print(f"{time.time()-t:.0f} s")
