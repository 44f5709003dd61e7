"""The torchvision families' characteristic structures, in tiny in-test models (CI installs no torchvision).

Each model reproduces what makes its family hard for channel analysis: grouped convs (ResNeXt, RegNet), dense
concatenation (DenseNet), channel split + shuffle (ShuffleNet V2), fire concat without BatchNorm (SqueezeNet),
inception branches with a training-only auxiliary head (GoogLeNet, Inception v3), squeeze-excitation with hardswish
(MobileNet V3), depthwise 7x7 + channels-last LayerNorm (ConvNeXt) and an attention block (ViT). The full zoo is
measured by bench/zoo_coverage.py (docs/research/torchvision-zoo.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.analysis import analyze, count_macs, macs_by_module
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.select.planner import ChannelPlanner
from dfp_deploy.models.random_init import non_degenerate_

torch.set_num_threads(1)
SIZE = 16


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ResNeXtLike(nn.Module):
    """Bottleneck whose 3x3 is a grouped conv (groups=4): the grouped conv ties its channels in blocks."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.reduce, self.grouped = cbr(16, 16, 1), cbr(16, 16, 3, groups=4)
        self.expand, self.bn = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn(self.expand(self.grouped(self.reduce(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLike(nn.Module):
    """Two dense layers (BN-ReLU-conv on the concatenation of everything before) and a transition."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layers = nn.ModuleList()
        for cin in (8, 12):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 8, 1, bias=False),
                                             nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False)))
        self.transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.norm, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        x = F.relu(self.norm(self.transition(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ShuffleLike(nn.Module):
    """Two ShuffleNet V2 units: split the channels in two, transform one half, concatenate, shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.branches = nn.ModuleList(nn.Sequential(cbr(8, 8, 1), nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
                                                    nn.BatchNorm2d(8), cbr(8, 8, 1)) for _ in range(2))
        self.last, self.fc = cbr(16, 24, 1), nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        for branch in self.branches:
            x1, x2 = x.chunk(2, dim=1)
            x = torch.cat((x1, branch(x2)), 1)
            b, c, h, w = x.size()
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.fc(self.last(x).mean([2, 3]))


class FireLike(nn.Module):
    """SqueezeNet: fire module (squeeze 1x1, expand 1x1 and 3x3 concatenated), no BatchNorm, conv classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.squeeze, self.e1, self.e3 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 12, 1), nn.Conv2d(8, 12, 3, padding=1)
        self.classifier = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        s = F.relu(self.squeeze(x))
        x = torch.cat([F.relu(self.e1(s)), F.relu(self.e3(s))], 1)
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.classifier(x)), 1), 1)


class InceptionAux(nn.Module):
    """Inception block (1x1, 1x1->3x3, pool->1x1 branches concatenated) plus torchvision's auxiliary-head
    convention: `aux_logits` and an `aux1` head that runs only in training."""

    def __init__(self, aux_logits: bool = True):
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1, self.b2 = cbr(16, 8, 1), nn.Sequential(cbr(16, 8, 1), cbr(8, 8))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(16, 8, 1))
        self.aux_logits = aux_logits
        self.aux1 = nn.Sequential(cbr(16, 8, 1), nn.Flatten(), nn.Linear(8 * SIZE * SIZE, 5)) if aux_logits else None
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        aux = self.aux1(x) if self.aux1 is not None and self.training else None
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)
        out = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return (out, aux) if self.training and self.aux_logits else out


class SEHardswish(nn.Module):
    """MobileNet V3 inverted residual: expand, depthwise, squeeze-excitation (hardsigmoid gate), project, add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), nn.Hardswish())
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        x = x + self.project(scale * y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConvNeXtLike(nn.Module):
    """ConvNeXt block: depthwise 7x7, channels-last LayerNorm and MLP, layer scale, residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm, self.mlp1, self.mlp2 = nn.LayerNorm(16), nn.Linear(16, 64), nn.Linear(64, 16)
        self.layer_scale = nn.Parameter(torch.full((16, 1, 1), 1e-6))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.mlp2(F.gelu(self.mlp1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        return self.head(x.mean([2, 3]))


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm encoder block (nn.MultiheadAttention + MLP), class token, zero-init head."""

    def __init__(self, dim: int = 16, patch: int = 4, heads: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)
        nn.init.zeros_(self.head.weight), nn.init.zeros_(self.head.bias)  # as torchvision's ViT head

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, 0])


class SDPAttention(nn.Module):
    """Attention written with functions, as timm and user code do: Linear q/k/v, scaled_dot_product_attention."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # [B, N, C]
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        scores = q @ k.transpose(-2, -1)  # counted too: an explicit product of two activations
        return self.proj(x) + scores.mean()


FAMILIES = [ResNeXtLike, DenseLike, ShuffleLike, FireLike, InceptionAux, SEHardswish, ConvNeXtLike, TinyViT]
# which families keep some prunable group, and the boundary reason expected in the warnings (None: no boundary)
EXPECT = {
    "ResNeXtLike": (True, "grouped convolution"),
    "DenseLike": (True, None),
    "ShuffleLike": (True, "moves or merges the channel dim"),
    "FireLike": (True, None),
    "InceptionAux": (True, None),
    "SEHardswish": (True, None),
    "ConvNeXtLike": (False, "'permute' moves the channel dim"),
    "TinyViT": (False, None),
}


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {cls.__name__: non_degenerate_(cls(), (3, SIZE, SIZE)) for cls in FAMILIES}


def test_non_degenerate_weights_give_unit_scale_outputs(models):
    """Default init gives degenerate outputs (TinyViT's zero head: all-zero logits; ConvNeXt's 1e-6 layer scale
    hides its block); after non_degenerate_ every family's logits have unit scale and the blocks matter."""
    torch.manual_seed(0)
    with torch.no_grad():
        assert float(TinyViT().eval()(_x()).abs().max()) == 0.0
    with torch.no_grad():
        for name, model in models.items():
            std = float(model(_x(8)).std())
            assert 0.2 < std < 5.0, (name, std)
        convnext = models["ConvNeXtLike"]
        assert float(convnext.layer_scale.abs().min()) > 1e-3
    bn = models["SEHardswish"].stem[1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_family_analysis_prunes_what_it_can(models, cls):
    """Each family: analysis finds its groups without crashing; prunable parts prune at 0.3 and the pruned model
    runs with fewer MACs; the parts it cannot prune are boundaries with a reason; an empty plan is bit-identical."""
    model, x = models[cls.__name__], _x()
    analysis = analyze(model, x[:1])
    some_prunable, reason = EXPECT[cls.__name__]
    assert any(g.prunable for g in analysis.groups) == some_prunable
    if reason is not None:
        assert any(reason in w for w in analysis.warnings), analysis.warnings
    with torch.no_grad():
        identical = prune_model(model, analysis, ChannelPlanner(model, analysis).plan(0.0))
        assert torch.equal(identical(x), model(x))
        if some_prunable:
            plan = ChannelPlanner(model, analysis, include_residual=True).plan(0.3)
            pruned = prune_model(model, analysis, plan)
            assert plan.keep and pruned(x).shape == model(x).shape
            assert count_macs(pruned, x[:1]) < count_macs(model, x[:1])


def test_auxiliary_head_is_reported_and_dropped_by_the_loader(models):
    """An aux head never runs in eval mode: analysis names it; the loader drops it (weights with it still load)."""
    from dfp_deploy.models.loader import drop_auxiliary_heads

    model = models["InceptionAux"]
    warnings = analyze(model, _x(1)).warnings
    assert any("aux1" in w and "never run in eval mode" in w for w in warnings), warnings
    import copy

    dropped_model = copy.deepcopy(model)
    assert drop_auxiliary_heads(dropped_model) == ["aux1"]
    assert dropped_model.aux1 is None and not any("never run" in w for w in analyze(dropped_model, _x(1)).warnings)
    assert drop_auxiliary_heads(models["ResNeXtLike"]) == []


def _build(tmp_path, factory: str, weights, ratio: float, *extra: str) -> dict:
    from dfp_deploy.pipeline import build
    from dfp_deploy.recipe import load_recipe

    sets = [f"model.name={factory}", f"model.weights={weights}", f"model.input_size=[3,{SIZE},{SIZE}]",
            f"compress.prune.ratio={ratio}", "target.batch=1", "measure.latency=false",
            "advanced.measure.rounding_cost=false", "advanced.measure.parity_samples=2", "compress.prune.round_to=1",
            *extra]
    return build(load_recipe(None, sets, out=str(tmp_path / "out")), quiet=True)


def test_pruned_inception_with_aux_head_builds_and_trains(models, tmp_path):
    """Through the factory form: the aux head is dropped, the rest pruned, and model.pt works in train mode too
    (before, the kept aux head read channels that pruning had removed)."""
    weights = tmp_path / "w.pt"
    torch.save(models["InceptionAux"].state_dict(), weights)  # holds aux1.*: the checkpoint a user would have
    report = _build(tmp_path, "test_zoo_families:InceptionAux", weights, 0.3)
    assert report["macs"]["after"] < report["macs"]["before"] and "notice" not in report["prune"]
    assert report["parity"]["max_abs_err"] <= 1e-3 * max(report["parity"]["ref_scale"], 1.0)
    pruned = torch.load(tmp_path / "out" / "model.pt", weights_only=False)
    pruned.train()
    assert pruned(_x(2)).shape == (2, 5)


def test_shuffled_channels_split_again_build_data_free_int8(models, tmp_path):
    """ShuffleNet's second unit splits a tensor whose channels the shuffle mixed (its data-free statistics are one
    summary channel): the split must give each half that summary, not an empty half (a ValueError before)."""
    from dfp_deploy.cli import _summary

    weights = tmp_path / "w.pt"
    torch.save(models["ShuffleLike"].state_dict(), weights)
    report = _build(tmp_path, "test_zoo_families:ShuffleLike", weights, 0.3, "target.precision=int8")
    assert report["parity"]["top1_agreement"] >= 0.5
    assert report["parity"]["max_abs_err"] <= 0.25 * report["parity"]["ref_scale"]
    # the branch-internal groups pruned, the shuffled ones held: the CLI says which op holds them, in one line
    assert report["prune"]["groups_pruned"] >= 1
    notice = report["prune"]["notice"]
    assert notice.startswith("not pruned: 3 of 7 channel groups, held by 8 ops the pruner cannot resize, e.g. "
                             "'chunk'") and len(notice) <= 300
    assert _summary(report).splitlines()[0] == f"notice: {notice}"


def test_a_grouped_convolution_is_named_as_what_holds_its_channels(models):
    """ResNeXt/RegNet: the grouped conv's channels stay, the rest prunes, and the build's notice says why."""
    from dfp_deploy.analysis import partly_pruned_notice

    notice = partly_pruned_notice(analyze(models["ResNeXtLike"], _x(1)))
    assert notice == ("not pruned: 1 of 3 channel groups, held by 1 op the pruner cannot resize, e.g. 'grouped_0' "
                      "(target grouped.0): grouped convolution (groups=4, in=16, out=16) ties channels in blocks; "
                      "`dfp-deploy inspect` lists each")
    assert partly_pruned_notice(analyze(models["DenseLike"], _x(1))) is None  # nothing held: nothing to say


def test_nothing_prunable_builds_with_a_notice(models, tmp_path):
    """A vision transformer has nothing prunable: the build goes through unpruned and says so in one line, which
    the CLI prints on stdout before its summary."""
    from dfp_deploy.cli import _summary

    weights = tmp_path / "w.pt"
    torch.save(models["TinyViT"].state_dict(), weights)
    report = _build(tmp_path, "test_zoo_families:TinyViT", weights, 0.3)
    notice = report["prune"]["notice"]
    assert notice.startswith("nothing was pruned: none of the model's") and len(notice) <= 300
    assert report["macs"]["after"] == report["macs"]["before"]
    assert _summary(report).splitlines()[0] == f"notice: {notice}"


def test_attention_macs_known_answer():
    """TinyViT at 16x16, patch 4, dim 16, 2 heads: 16 patches + class token = 17 tokens (docs/methods/macs.md).
    patch conv 16·16·(3·4·4) = 12288; attention projections 4·17·16·16 = 17408; q kᵀ and weights·v 2·17·17·16 =
    9248; MLP 17·16·32 + 17·32·16 = 17408; head 16·5 = 80."""
    model = TinyViT().eval()
    assert count_macs(model, _x(1)) == 12288 + 17408 + 9248 + 17408 + 80
    assert count_macs(model, _x(2)) == count_macs(model, _x(1))  # per image
    assert macs_by_module(model, _x(1))["attn"] == 17408 + 9248


def test_functional_attention_macs_known_answer():
    """SDPAttention on [1, 5, 8], 2 heads of 4: qkv 5·24·8 = 960; sdpa 2·5·5·(4+4) = 400; q kᵀ 2·5·5·4 = 200;
    proj 5·8·8 = 320."""
    model = SDPAttention().eval()
    x = torch.randn(1, 5, 8)
    assert count_macs(model, x) == 960 + 400 + 200 + 320
    assert macs_by_module(model, x)[""] == 600  # the functions run in the root module's forward


def test_notice_names_include_residual_when_only_residual_groups_are_prunable(models):
    """ResNeXt-like: the grouped conv freezes the block's inner channels; only the residual stream is prunable, and
    by default residual groups are not pruned, so the notice names the key that would prune them."""
    from dfp_deploy.analysis import nothing_pruned_notice

    analysis = analyze(models["ResNeXtLike"], _x(1))
    assert "advanced.compress.prune.include_residual=true" in nothing_pruned_notice(analysis)
    assert "keep every channel" in nothing_pruned_notice(analysis, include_residual=True)
    vit = nothing_pruned_notice(analyze(models["TinyViT"], _x(1)))
    assert vit.startswith("nothing was pruned: none of the model's") and len(vit) <= 280


class Versioned(nn.Module):
    """Like torchvision's MNASNet: loading reads the checkpoint's version from the state_dict metadata."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_weights_keep_the_state_dict_version(tmp_path):
    """The strict loader rebuilt the state_dict as a plain dict, dropping the version metadata such modules need."""
    from dfp_deploy.models.weights import load_weights

    torch.save(Versioned().state_dict(), tmp_path / "saved.pt")
    torch.save(dict(Versioned().state_dict()), tmp_path / "plain.pt")  # no metadata at all: the current version
    for name in ("saved.pt", "plain.pt"):
        model = Versioned()
        load_weights(model, tmp_path / name)
        assert torch.equal(model.conv.weight, torch.load(tmp_path / name)["conv.weight"])
