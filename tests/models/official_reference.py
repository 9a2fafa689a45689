"""An independent, functional re-statement of the original MDEQ forward (unrolled mode), written from the
architecture description of locuslab/mdeq and locuslab/deq. It reads a state dict in the *official* format
(weight_g / weight_v) and uses only torch.nn.functional, so it shares no code with mdeq.models."""
import torch
import torch.nn.functional as F


def _bn(W, p, x, affine=True):
    w = W.get(p + ".weight") if affine else None
    b = W.get(p + ".bias") if affine else None
    return F.batch_norm(x, W[p + ".running_mean"], W[p + ".running_var"], w, b, False, 0.0, 1e-5)


def _gn(W, p, x, groups):
    return F.group_norm(x, groups, W.get(p + ".weight"), W.get(p + ".bias"), 1e-5)


def _wn(W, p):
    g, v = W[p + ".weight_g"], W[p + ".weight_v"]
    return v * (g / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1))


def equilibrium_unrolled(W, cfg, x):
    d, n, G = cfg.downsample_times, cfg.num_branches, cfg.num_groups
    x = F.relu(_bn(W, "downsample.1", F.conv2d(x, W["downsample.0.weight"], stride=2 if d >= 1 else 1, padding=1)))
    x = F.relu(_bn(W, "downsample.4", F.conv2d(x, W["downsample.3.weight"], stride=2 if d >= 2 else 1, padding=1)))
    if "stage0.0.weight" in W:
        x = F.relu(_bn(W, "stage0.1", F.conv2d(x, W["stage0.0.weight"])))
    b_, _, h, w = x.shape
    u = [x] + [torch.zeros(b_, cfg.num_channels[i], h // 2 ** i, w // 2 ** i) for i in range(1, n)]

    def f(z):
        blocks = []
        for i in range(n):
            p = f"fullstage.branches.{i}.blocks.0"
            out = F.relu(_gn(W, p + ".gn1", F.conv2d(z[i], _wn(W, p + ".conv1"), padding=1), G))
            out = F.conv2d(out, _wn(W, p + ".conv2"), padding=1) + u[i]
            out = _gn(W, p + ".gn2", out, G) + z[i]
            blocks.append(_gn(W, p + ".gn3", F.relu(out), G))
        new = []
        for i in range(n):
            y = 0
            for j in range(n):
                q = f"fullstage.fuse_layers.{i}.{j}.net"
                if i == j:
                    t = blocks[j]
                elif j > i:
                    t = _gn(W, q + ".gnorm", F.conv2d(blocks[j], W[q + ".conv.weight"]), G)
                    t = F.interpolate(t, scale_factor=2 ** (j - i), mode="nearest")
                else:
                    t = blocks[j]
                    for k in range(i - j):
                        t = _gn(W, f"{q}.{k}.gnorm", F.conv2d(t, W[f"{q}.{k}.conv.weight"], stride=2, padding=1), G)
                        if k < i - j - 1:
                            t = F.relu(t)
                y = y + t
            p = f"fullstage.post_fuse_layers.{i}"
            new.append(_gn(W, p + ".gnorm", F.conv2d(F.relu(y), _wn(W, p + ".conv")), G // 2))
        return new

    z = [torch.zeros_like(t) for t in u]
    for _ in range(cfg.num_layers):
        z = f(z)
    return z


def classify(W, cfg, x):
    z = equilibrium_unrolled(W, cfg, x)

    def bottleneck(p, t):
        out = F.relu(_bn(W, p + ".bn1", F.conv2d(t, W[p + ".conv1.weight"]), affine=False))
        out = F.relu(_bn(W, p + ".bn2", F.conv2d(out, W[p + ".conv2.weight"], padding=1), affine=False))
        out = _bn(W, p + ".bn3", F.conv2d(out, W[p + ".conv3.weight"]), affine=False)
        return F.relu(out + _bn(W, p + ".downsample.1", F.conv2d(t, W[p + ".downsample.0.weight"])))

    y = bottleneck("incre_modules.0.0", z[0])
    for i in range(cfg.num_branches - 1):
        down = F.conv2d(y, W[f"downsamp_modules.{i}.0.weight"], W[f"downsamp_modules.{i}.0.bias"], stride=2, padding=1)
        y = bottleneck(f"incre_modules.{i + 1}.0", z[i + 1]) + F.relu(_bn(W, f"downsamp_modules.{i}.1", down))
    y = F.relu(_bn(W, "final_layer.1", F.conv2d(y, W["final_layer.0.weight"], W["final_layer.0.bias"])))
    y = F.avg_pool2d(y, kernel_size=y.shape[2:]).flatten(1)
    return F.linear(y, W["classifier.weight"], W["classifier.bias"])


def segment(W, cfg, x):
    z = equilibrium_unrolled(W, cfg, x)
    size = z[0].shape[2:]
    y = torch.cat([z[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=True) for t in z[1:]], 1)
    y = F.relu(_bn(W, "last_layer.1", F.conv2d(y, W["last_layer.0.weight"], W["last_layer.0.bias"])))
    return F.conv2d(y, W["last_layer.3.weight"], W["last_layer.3.bias"])
