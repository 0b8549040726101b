"""VGG-19 with the BN head at initialisation: each conv output's std and each layer's gradient / weight norm,
for pixels/255 input and mean/std input (python docs/results/progress/vgg19-bn-head-probes/init_scales.py)."""
import torch
from vggkit.models import create_model
torch.set_num_threads(1)
torch.manual_seed(0)
x_unit = torch.rand(64, 3, 32, 32) * 0.5 + 0.25   # CIFAR-ish pixel/255: mean ~0.47
y = torch.randint(0, 10, (64,))
for norm in ("unit", "meanstd"):
    torch.manual_seed(0)
    m = create_model("vgg19", num_classes=10, in_channels=3, input_size=32, head="bn")
    m.train()
    x = x_unit if norm == "unit" else (x_unit - 0.47) / 0.25
    stds = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: stds.append(o.detach().std().item()))
             for mod in m.features if isinstance(mod, torch.nn.Conv2d)]
    loss = torch.nn.functional.cross_entropy(m(x), y)
    loss.backward()
    for h in hooks: h.remove()
    ratios = [(p.grad.norm() / p.norm()).item() for n, p in m.named_parameters() if n.startswith("features") and n.endswith("weight")]
    head = [(n, round((p.grad.norm() / p.norm()).item(), 5)) for n, p in m.named_parameters() if n.startswith("classifier") and n.endswith("weight") and p.dim() == 2]
    print(norm, "conv out std:", [f"{s:.2g}" for s in stds])
    print(norm, "conv grad/weight:", [f"{r:.2g}" for r in ratios])
    print(norm, "head grad/weight:", head)
