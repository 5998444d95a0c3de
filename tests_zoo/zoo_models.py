"""Real torchvision and timm models for the zoo checks, and the measurements made on them.

Shared by the zoo tests (``tests_zoo/``) and the table script
(``python -m benchmarks.zoo_table``), so that both report the same figures.

Every model is built with random weights (nothing is downloaded), its
normalisation layers get random running statistics and affine parameters
(:func:`randomize_norms`; fresh ones are the identity, which hides bugs), it is
put in eval mode and cast to float64. :func:`measure` then runs one
forward/backward step eagerly (the reference) and through
``convbn_pass.backends.light`` without the pass and under the ``auto`` and
``memory`` policies, and records what the checks need: errors on one scale per
model, the pass's decisions (as its ``on_graph`` callback hands them over), the
pairs counted independently of the pass in the same Dynamo graphs
(:func:`eligible_pairs`), the pairs seen eagerly (:func:`eager_pairs`) and the
activation bytes each run keeps for backward.

torchvision and timm are imported inside the builders only, so this module
imports (and the zoo tests are collected, then skipped) where they do not.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import re
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import convbn_pass
import convbn_pass.backends
import convbn_pass.memory
from convbn_pass import Decision, GraphRewrite
from convbn_pass.core.records import tally

__all__ = [
    "Case", "CASES", "CASE_IDS", "Errors", "EligiblePair", "PolicyRun", "Step", "TuneRun",
    "ZooRun", "zoo_run",
    "randomize_norms", "freeze_batchnorm", "eligible_pairs", "eager_pairs",
    "train_step", "scaled_errors", "measure", "measure_fresh", "build", "sample", "kept_graphs",
]

# The policies measured on every model, None standing for the light backend without the pass.
POLICIES: tuple[str | None, ...] = (None, "auto", "memory")


# ---------------------------------------------------------------------------
# Random statistics.
# ---------------------------------------------------------------------------

def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer with running statistics: any ``_BatchNorm`` (timm's
    BatchNormAct2d included) and the frozen ones (torchvision's and timm's
    FrozenBatchNorm2d, timm's FrozenBatchNormAct2d), which keep the same four
    tensors as buffers."""
    return (isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor))


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every normalisation layer with running statistics random ones, and
    random affine parameters: mean N(0, 0.5²), variance U[0.5, 2], weight
    U[0.5, 1.5], bias N(0, 0.2²), as :func:`convbn_pass.zoo.randomize_bn` does.

    That function reaches ``_BatchNorm`` subclasses only; the frozen layers
    (``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``) are not ``_BatchNorm``s and
    would stay the identity there."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not _is_norm(module):
            continue
        n = module.running_mean.numel()
        module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
        module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by torchvision's
    ``FrozenBatchNorm2d`` with the same eps: what torchvision's detection builders
    use (``norm_layer=FrozenBatchNorm2d``) when backbone weights are given, here
    without downloading them."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            freeze_batchnorm(child)
    return module


# ---------------------------------------------------------------------------
# The models.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One model of the zoo."""

    id: str                                  # "torchvision-resnet18": the test id
    factory: Callable[[], nn.Module]         # random weights, any mode and dtype
    input_shape: tuple[int, ...]             # batch included
    # Reasons the pass may record under the ``memory`` policy, each with why it is
    # the right one for this model (empty: every candidate pair is tuned).
    skips: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Pairs seen eagerly (module hooks) that are not in a Dynamo graph as a pair,
    # with why; None: the two counts must agree.
    unseen: str | None = None
    about: str = ""                          # what the model exercises
    slow: bool = False                       # off unless ``-m slow``


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return factory


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    return factory


def _vgg11_bn() -> nn.Module:
    """VGG-11 with BN; its classifier (Linear 25088→4096→4096→1000, 123 M
    parameters, no BatchNorm) is replaced by one Linear to 10 classes so that the
    float64 copies fit in memory. Every conv-BN pair is in ``features``, unchanged."""
    model = _tv("vgg11_bn")()
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    return model


def _s3d() -> nn.Module:
    """S3D whose final ``AvgPool3d((2, 7, 7))``, which fixes the input at 16×224×224,
    is an adaptive average pool, so that it runs on 8×64×64 clips. Every conv and
    BatchNorm is torchvision's."""
    model = _tv("s3d")()
    model.avgpool = nn.AdaptiveAvgPool3d(1)
    return model


def _convmixer() -> nn.Module:
    """timm's ConvMixer at width 64, depth 2 (the registered ones are 768-1536 wide).
    Its blocks are conv → activation → BatchNorm: no conv feeds a BatchNorm directly."""
    from timm.models.convmixer import ConvMixer
    return ConvMixer(dim=64, depth=2, kernel_size=5, patch_size=4, num_classes=10)


def _timm_frozen(name: str) -> Callable[[], nn.Module]:
    """A timm model after ``timm.layers.freeze_batch_norm_2d`` (BatchNormAct2d →
    FrozenBatchNormAct2d, BatchNorm2d → FrozenBatchNorm2d), as timm fine-tuning
    with frozen BN does."""
    def factory() -> nn.Module:
        from timm.layers import freeze_batch_norm_2d
        return freeze_batch_norm_2d(_timm(name)())
    return factory


# Detection: the raw outputs of every layer that has parameters.

def _fixed_boxes(height: int, width: int, per_side: int = 3) -> torch.Tensor:
    """A fixed grid of ``per_side²`` boxes inside an image, [N, 4] as x1, y1, x2, y2."""
    step_y, step_x = height / per_side, width / per_side
    boxes = [(j * step_x, i * step_y, (j + 1.5) * step_x, (i + 1.5) * step_y)
             for i in range(per_side) for j in range(per_side)]
    box = torch.tensor(boxes, dtype=torch.float64)
    box[:, 2].clamp_(max=width)
    box[:, 3].clamp_(max=height)
    return box


class RCNNRawHeads(nn.Module):
    """A two-stage torchvision detector (Faster/Mask/Keypoint R-CNN) without its
    data-dependent steps: backbone and FPN, the RPN head's raw objectness and box
    deltas at every level, then the RoI heads (box, and mask or keypoint where the
    model has them) on a fixed grid of boxes per image instead of the RPN's
    proposals.

    Left out: the input transform (normalise, resize to 800 px), anchors, box
    decoding, top-k and NMS, the steps without parameters whose results flip on
    near-ties with random weights. Every layer with parameters runs, and every
    output is a differentiable function of the image and the parameters."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.rpn_head = detector.rpn.head
        self.roi_heads = detector.roi_heads

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(images)
        objectness, deltas = self.rpn_head(list(features.values()))
        height, width = images.shape[-2:]
        sizes = [(height, width)] * images.shape[0]
        boxes = [_fixed_boxes(height, width).to(images)] * images.shape[0]
        heads = self.roi_heads
        outputs = [*objectness, *deltas]
        box_features = heads.box_head(heads.box_roi_pool(features, boxes, sizes))
        outputs.extend(heads.box_predictor(box_features))
        if heads.has_mask():
            mask_features = heads.mask_head(heads.mask_roi_pool(features, boxes, sizes))
            outputs.append(heads.mask_predictor(mask_features))
        if heads.has_keypoint():
            keypoint_features = heads.keypoint_head(
                heads.keypoint_roi_pool(features, boxes, sizes))
            outputs.append(heads.keypoint_predictor(keypoint_features))
        return outputs


class DenseRawHeads(nn.Module):
    """A one-stage torchvision detector (RetinaNet, FCOS, SSD/SSDlite): backbone
    (and FPN) and the head's raw outputs (class logits, box regression, FCOS's
    centerness) for every anchor position. Left out, as in :class:`RCNNRawHeads`:
    the input transform, anchors, box decoding and NMS."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = {"0": features}
        head = self.head(list(features.values()))
        return [head[key] for key in sorted(head)]


def _detector(name: str, frozen: bool, **kwargs: Any) -> Callable[[], nn.Module]:
    """torchvision's ``name`` with random weights as raw heads; ``frozen``: its
    backbone's BatchNorm2d layers become FrozenBatchNorm2d, as torchvision builds
    them when backbone weights are given."""
    def factory() -> nn.Module:
        detector = _tv(name, weights_backbone=None, **kwargs)()
        if frozen:
            freeze_batchnorm(detector.backbone.body if hasattr(detector.backbone, "body")
                             else detector.backbone)
        two_stage = hasattr(detector, "rpn")
        return RCNNRawHeads(detector) if two_stage else DenseRawHeads(detector)
    return factory


_IMG = (2, 3, 64, 64)          # batch 2 at 64 px: classification
_VIDEO = (2, 3, 4, 32, 32)     # batch 2, 4 frames at 32 px
_DET = (1, 3, 128, 128)        # one 128 px image: every FPN level at least 2x2

_MULTI_USER_SPP = ("the last conv's output also feeds a second branch (its pooled copy): "
                   "a conv with two users cannot be rewritten without changing the other")

CASES: tuple[Case, ...] = (
    # torchvision classification: one per family with BatchNorm, the smallest.
    Case("torchvision-resnet18", _tv("resnet18"), _IMG, about="ResNet"),
    Case("torchvision-resnext50_32x4d", _tv("resnext50_32x4d"), _IMG, about="grouped 3x3"),
    Case("torchvision-wide_resnet50_2", _tv("wide_resnet50_2"), _IMG, about="Wide ResNet"),
    Case("torchvision-mobilenet_v2", _tv("mobilenet_v2"), _IMG, about="ReLU6, depthwise"),
    Case("torchvision-mobilenet_v3_small", _tv("mobilenet_v3_small"), _IMG,
         about="hardswish, SE"),
    Case("torchvision-efficientnet_b0", _tv("efficientnet_b0"), _IMG, about="SiLU, SE"),
    Case("torchvision-efficientnet_v2_s", _tv("efficientnet_v2_s"), _IMG,
         about="fused MBConv"),
    Case("torchvision-regnet_y_400mf", _tv("regnet_y_400mf"), _IMG, about="grouped, SE"),
    Case("torchvision-mnasnet0_5", _tv("mnasnet0_5"), _IMG, about="MNASNet"),
    Case("torchvision-shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), _IMG,
         about="channel split and shuffle"),
    Case("torchvision-densenet121", _tv("densenet121"), _IMG,
         about="BN-ReLU-conv, concatenations"),
    Case("torchvision-googlenet", _tv("googlenet", aux_logits=False, init_weights=False),
         _IMG, about="Inception branches"),
    Case("torchvision-inception_v3", _tv("inception_v3", aux_logits=False,
                                          init_weights=False),
         (2, 3, 75, 75), about="asymmetric kernels"),
    Case("torchvision-vgg11_bn", _vgg11_bn, _IMG, about="plain conv-BN stack"),
    # torchvision video: 3-D convs.
    Case("torchvision-r3d_18", _tv("r3d_18"), _VIDEO, about="conv3d"),
    Case("torchvision-mc3_18", _tv("mc3_18"), _VIDEO, about="mixed 3-D/2-D convs"),
    Case("torchvision-r2plus1d_18", _tv("r2plus1d_18"), _VIDEO,
         about="(2+1)-D factorised convs"),
    Case("torchvision-s3d", _s3d, (1, 3, 8, 64, 64), about="separable 3-D convs"),
    # torchvision segmentation.
    Case("torchvision-deeplabv3_mobilenet_v3_large",
         _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, aux_loss=False), _IMG,
         about="dilated MobileNetV3, ASPP"),
    Case("torchvision-fcn_resnet50", _tv("fcn_resnet50", weights_backbone=None,
                                         aux_loss=False), _IMG, about="dilated ResNet-50"),
    Case("torchvision-lraspp_mobilenet_v3_large",
         _tv("lraspp_mobilenet_v3_large", weights_backbone=None), _IMG, about="LR-ASPP"),
    # torchvision detection: raw head outputs (see RCNNRawHeads, DenseRawHeads).
    Case("torchvision-fasterrcnn_resnet50_fpn",
         _detector("fasterrcnn_resnet50_fpn", frozen=True), _DET,
         about="FrozenBatchNorm2d backbone, FPN, RoI heads"),
    Case("torchvision-fasterrcnn_mobilenet_v3_large_fpn",
         _detector("fasterrcnn_mobilenet_v3_large_fpn", frozen=True), _DET,
         about="FrozenBatchNorm2d MobileNetV3 backbone"),
    Case("torchvision-fasterrcnn_resnet50_fpn_v2",
         _detector("fasterrcnn_resnet50_fpn_v2", frozen=False), _DET,
         about="BatchNorm2d in backbone, FPN and heads"),
    Case("torchvision-retinanet_resnet50_fpn",
         _detector("retinanet_resnet50_fpn", frozen=True), _DET,
         about="FrozenBatchNorm2d backbone, dense head"),
    Case("torchvision-fcos_resnet50_fpn", _detector("fcos_resnet50_fpn", frozen=True),
         _DET, about="FrozenBatchNorm2d backbone, GroupNorm head"),
    Case("torchvision-ssdlite320_mobilenet_v3_large",
         _detector("ssdlite320_mobilenet_v3_large", frozen=False), _DET,
         about="BatchNorm2d backbone and heads"),
    Case("torchvision-maskrcnn_resnet50_fpn", _detector("maskrcnn_resnet50_fpn", frozen=True),
         _DET, about="mask head"),
    Case("torchvision-keypointrcnn_resnet50_fpn",
         _detector("keypointrcnn_resnet50_fpn", frozen=True), _DET, about="keypoint head"),
    # timm: families chosen for the forms they exercise.
    Case("timm-resnet18d", _timm("resnet18d"), _IMG, about="deep stem, avg-pool shortcut"),
    Case("timm-efficientnet_b0", _timm("efficientnet_b0"), _IMG, about="BatchNormAct2d"),
    Case("timm-efficientnet_b0-frozen", _timm_frozen("efficientnet_b0"), _IMG,
         about="FrozenBatchNormAct2d"),
    Case("timm-tf_efficientnet_b0", _timm("tf_efficientnet_b0"), _IMG,
         about="TF 'same' padding (Conv2dSame)"),
    Case("timm-tf_mobilenetv3_small_100", _timm("tf_mobilenetv3_small_100"), _IMG,
         about="TF 'same' padding, hardswish"),
    Case("timm-resnest14d", _timm("resnest14d"), _IMG, about="split attention"),
    Case("timm-resnext26ts", _timm("resnext26ts"), _IMG, about="grouped convs, ByobNet"),
    Case("timm-repvgg_a0", _timm("repvgg_a0"), _IMG, about="RepVGG branches, identity BN"),
    Case("timm-dla34", _timm("dla34"), _IMG, about="deep layer aggregation"),
    Case("timm-hrnet_w18_small", _timm("hrnet_w18_small"), _IMG,
         about="multi-resolution branches"),
    Case("timm-cspresnet50", _timm("cspresnet50"), _IMG, about="cross-stage partial"),
    Case("timm-ghostnet_050", _timm("ghostnet_050"), _IMG, about="ghost modules"),
    Case("timm-mixnet_s", _timm("mixnet_s"), _IMG, about="mixed depthwise kernels"),
    Case("timm-dpn68", _timm("dpn68"), _IMG, about="dual path, BN-act-conv"),
    Case("timm-ese_vovnet19b_dw", _timm("ese_vovnet19b_dw"), _IMG, about="VoVNet, eSE"),
    Case("timm-legacy_xception", _timm("legacy_xception"), (2, 3, 71, 71),
         about="separable convs"),
    Case("timm-convmixer", _convmixer, _IMG, about="conv → act → BN: no pairs"),
    Case("timm-lcnet_050", _timm("lcnet_050"), _IMG, about="PP-LCNet"),
    Case("timm-fbnetc_100", _timm("fbnetc_100"), _IMG, about="FBNet"),
    Case("timm-regnetx_002", _timm("regnetx_002"), _IMG, about="ConvNormAct, grouped"),
)

CASE_IDS: dict[str, Case] = {case.id: case for case in CASES}


def _detector_backbone(name: str) -> Callable[[], nn.Module]:
    """The backbone (ResNet body with FrozenBatchNorm2d, and FPN) of torchvision's
    detector ``name``; returns the dict of FPN feature maps."""
    def factory() -> nn.Module:
        detector = _tv(name, weights_backbone=None)()
        freeze_batchnorm(detector.backbone.body)
        return detector.backbone
    return factory


# End to end through Inductor in float32 (tests_zoo/test_zoo_inductor_float32.py).
FLOAT32_CASES: tuple[Case, ...] = (
    Case("torchvision-resnet50", _tv("resnet50"), (1, 3, 64, 64), about="ReLU, max-pool"),
    Case("timm-efficientnet_b0", _timm("efficientnet_b0"), (1, 3, 64, 64),
         about="BatchNormAct2d, SiLU"),
    Case("torchvision-fasterrcnn_resnet50_fpn-backbone",
         _detector_backbone("fasterrcnn_resnet50_fpn"), (1, 3, 64, 64),
         about="FrozenBatchNorm2d ResNet-50 and FPN"),
)


def build(case: Case, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The model of ``case``: seeded random weights and statistics, eval mode, ``dtype``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = case.factory()
    return randomize_norms(model, seed).eval().to(dtype)


def sample(case: Case, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded random input batch of ``case``'s shape."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(case.input_shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------
# Pairs counted independently of the pass.
# ---------------------------------------------------------------------------

class EligiblePair(NamedTuple):
    """A pair this module's own reading of the graph finds, apart from the pass's."""

    conv: str    # module path of the conv/linear: "layer1.0.conv1"
    norm: str    # module path of the BatchNorm (or frozen BN)
    kind: str    # "batch_norm" or "affine"
    activation_numel: int   # elements of the conv output
    weight_numel: int       # elements of the conv weight
    follower: str | None    # "hardtanh" (ReLU6) or "relu→max_pool" after the pair, else None

    @property
    def key(self) -> tuple[str, str]:
        return (self.conv, self.norm)


_CONVS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
          torch.conv_transpose2d, torch.conv_transpose3d, F.linear}
_MULS = {operator.mul, torch.mul}
_ADDS = {operator.add, torch.add}
# Argument positions of the two BatchNorm forms Dynamo records.
_BN_ARGS = {
    F.batch_norm: {"running_mean": 1, "running_var": 2, "training": 5},
    torch.batch_norm: {"running_mean": 3, "running_var": 4, "training": 5},
}


def _path(node: fx.Node) -> str:
    """The module a node was traced in, "layer1.0.conv1", from Dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    raw = str(list(stack.values())[-1][0])
    raw = re.sub(r"^L\['[^']*'\]", "", raw)
    raw = re.sub(r"\._modules\['([^']*)'\]", r".\1", raw)
    raw = re.sub(r"\[['\"]?([^\]'\"]*)['\"]?\]", r".\1", raw)
    return raw.strip(".") or node.name


def _value(arg: Any) -> torch.Tensor | None:
    value = arg.meta.get("example_value") if isinstance(arg, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _argument(node: fx.Node, name: str, index: int, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if index < len(node.args) else default


def _single_conv_user(node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in _CONVS and len(node.users) == 1)


def _eval_bn_pair(node: fx.Node) -> bool:
    """``F.batch_norm``/``torch.batch_norm`` with ``training=False`` (a constant),
    both running statistics given, channels equal to the conv's, reading a conv
    whose only user it is (a linear only with a 2-D output)."""
    positions = _BN_ARGS[node.target]  # type: ignore[index]
    conv = node.args[0] if node.args else node.kwargs.get("input")
    if not _single_conv_user(conv) or _argument(node, "training", positions["training"],
                                                False) is not False:
        return False
    mean = _argument(node, "running_mean", positions["running_mean"])
    var = _argument(node, "running_var", positions["running_var"])
    out, stats = _value(conv), _value(mean)
    if var is None or out is None or stats is None:
        return False
    if conv.target is F.linear and out.dim() != 2:
        return False
    return out.shape[1] == stats.shape[0]


def _per_channel(arg: Any, out: torch.Tensor) -> bool:
    """Shape ``[1, C, 1, ...]`` with C the conv output's channels."""
    value = _value(arg)
    return (value is not None and value.dim() == out.dim()
            and list(value.shape) == [1, out.shape[1]] + [1] * (out.dim() - 2))


def _affine_pair(node: fx.Node) -> bool:
    """``conv * scale + shift`` with per-channel ``[1, C, 1, 1]`` scale and shift
    (what FrozenBatchNorm2d computes), the conv's only user the multiply and the
    multiply's only user the add."""
    if len(node.args) != 2:
        return False
    conv, scale = node.args if _single_conv_user(node.args[0]) else node.args[::-1]
    out = _value(conv)
    if not _single_conv_user(conv) or out is None or conv.target is F.linear:
        return False
    if not _per_channel(scale, out) or len(node.users) != 1:
        return False
    add = next(iter(node.users))
    if add.op != "call_function" or add.target not in _ADDS or len(add.args) != 2:
        return False
    shift = add.args[1] if add.args[0] is node else add.args[0]
    return _per_channel(shift, out)


_RELUS = {F.relu, torch.relu, torch.relu_, "relu", "relu_"}
_RELU6 = {F.hardtanh, F.relu6, "hardtanh", "hardtanh_"}
_MAX_POOLS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}


def _is_call(node: fx.Node, targets: set[Any]) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def _follower(out: fx.Node) -> str | None:
    """What reads the pair's output, where the ``auto`` policy cares on CPU: one
    ReLU6 (``hardtanh``), or one ReLU with a max-pool among its users."""
    users = list(out.users)
    if len(users) != 1:
        return None
    if _is_call(users[0], _RELU6):
        return "hardtanh"
    if _is_call(users[0], _RELUS) and any(_is_call(u, _MAX_POOLS) for u in users[0].users):
        return "relu→max_pool"
    return None


def _pair(conv: fx.Node, norm: fx.Node, out: fx.Node, kind: str) -> EligiblePair:
    weight = conv.args[1] if len(conv.args) > 1 else conv.kwargs["weight"]
    return EligiblePair(_path(conv), _path(norm), kind, _value(conv).numel(),  # type: ignore[union-attr]
                _value(weight).numel(), _follower(out))  # type: ignore[union-attr]


def eligible_pairs(gm: fx.GraphModule) -> list[EligiblePair]:
    """The pairs in one Dynamo graph that Tune mode may rewrite, counted without
    the pass: an eval-mode BatchNorm call or a frozen-BN affine reading a conv or
    linear whose output nothing else reads (see :func:`_eval_bn_pair`,
    :func:`_affine_pair`). Conservative: anything else (a BN after a concat, an
    activation between conv and BN, a conv output read twice) is not a pair."""
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BN_ARGS and _eval_bn_pair(node):
            conv = node.args[0] if node.args else node.kwargs["input"]
            pairs.append(_pair(conv, node, node, "batch_norm"))
        elif node.target in _MULS and _affine_pair(node):
            conv = next(a for a in node.args if _single_conv_user(a))
            pairs.append(_pair(conv, node, next(iter(node.users)), "affine"))
    return pairs


_CONV_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


@torch.no_grad()
def eager_pairs(model: nn.Module, *inputs: Any) -> list[tuple[str, str]]:
    """(conv module, norm module) pairs of one eager forward, found with module
    hooks: a normalisation layer (see :func:`_is_norm`) whose input tensor is the
    very tensor a conv or linear module returned. Independent of Dynamo: the
    check that graphs lose no pair (a graph break between a conv and its BN would)."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)
        return hook

    def norm_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            seen = produced.get(id(x))
            if seen is not None and seen[1] is x:
                pairs.append((seen[0], name))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, _CONV_MODULES):
            handles.append(module.register_forward_hook(conv_hook(name)))
        elif _is_norm(module):
            handles.append(module.register_forward_pre_hook(norm_hook(name)))
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return pairs


# ---------------------------------------------------------------------------
# One training step and its errors.
# ---------------------------------------------------------------------------

def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for key in sorted(out) for t in _tensors(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


@dataclasses.dataclass
class Step:
    """Outputs and gradients of one forward/backward."""

    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor | None]   # "input" and every parameter's name


def train_step(fn: Callable[..., Any], model: nn.Module, x: torch.Tensor) -> Step:
    """``fn(x)`` then backward of ``sum(out * u)`` with a fixed random ``u`` per
    output, so that every output element matters; ``model`` owns the parameters
    (fresh: their ``.grad`` must be None)."""
    x = x.detach().clone().requires_grad_(True)
    outputs = [t for t in _tensors(fn(x)) if t.is_floating_point()]
    gen = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t)).sum()
               for t in outputs)
    loss.backward()  # type: ignore[union-attr]
    grads: dict[str, torch.Tensor | None] = {"input": x.grad}
    grads.update((name, p.grad) for name, p in model.named_parameters() if p.requires_grad)
    return Step([t.detach() for t in outputs], grads)


class Errors(NamedTuple):
    output: float      # max |out - ref| / max |ref out|, over every output
    gradient: float    # max |g - ref g| / the largest |ref gradient entry| of the model
    worst: str         # the gradient (or "output") where the larger one is


def scaled_errors(got: Step, ref: Step) -> Errors:
    """Errors of ``got`` against ``ref`` on one scale per model: outputs against
    the largest output entry, gradients against the largest gradient entry over all
    gradients. Judged one by one, gradients that are numerically zero (~1e-16)
    would be rounding noise alone.

    A gradient present in one step and missing in the other is an error."""
    assert len(got.outputs) == len(ref.outputs), "different number of outputs"
    out_scale = max(float(t.abs().max()) for t in ref.outputs)
    out_err = max(float((g - r).abs().max()) for g, r in zip(got.outputs, ref.outputs))
    missing = [name for name, g in ref.grads.items() if (g is None) != (got.grads.get(name) is None)]
    assert not missing, f"gradients present in one step only: {missing[:5]}"
    present = {name: g for name, g in ref.grads.items() if g is not None}
    grad_scale = max(float(g.abs().max()) for g in present.values())
    grad_errs = {name: float((got.grads[name] - g).abs().max()) / grad_scale  # type: ignore[operator]
                 for name, g in present.items()}
    worst = max(grad_errs, key=grad_errs.get)  # type: ignore[arg-type]
    return Errors(out_err / out_scale, grad_errs[worst], worst)


# ---------------------------------------------------------------------------
# Measuring one model.
# ---------------------------------------------------------------------------

GraphKey = tuple[str | None, int]   # Dynamo's (compile id, attempt); (None, 0) outside Dynamo


def _graph_key() -> GraphKey:
    """The compile in progress, read from Dynamo (not from the pass)."""
    from torch._guards import CompileContext
    trace = CompileContext.current_trace_id()
    return (None, 0) if trace is None else (str(trace.compile_id), int(trace.attempt))


class _Recorder:
    """A light backend under ``policy`` that first counts the eligible pairs of
    each graph it gets, before the pass sees it, and collects what the pass hands
    its ``on_graph`` callback (the graph's decisions) for the same graph."""

    def __init__(self, policy: str | None) -> None:
        self.rewrites: list[GraphRewrite] = []
        self.inner = convbn_pass.backends.light(policy, on_graph=self.rewrites.append)
        self.graphs: list[tuple[GraphKey, list[EligiblePair]]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs.append((_graph_key(), eligible_pairs(gm)))
        return self.inner(gm, example_inputs)


def kept_graphs(keys: Iterable[GraphKey]) -> set[GraphKey]:
    """The graphs Dynamo kept: a restarted compile (attempt 1 after 0) drops its
    earlier attempts."""
    latest: dict[str | None, int] = {}
    for compile_id, attempt in keys:
        latest[compile_id] = max(latest.get(compile_id, 0), attempt)
    return set(latest.items())


@dataclasses.dataclass
class PolicyRun:
    """The light backend under one policy (None: without the pass)."""

    policy: str | None
    errors: Errors
    saved_bytes: int                    # activations kept for backward
    decisions: list[Decision]           # from the pass's on_graph callback, graphs Dynamo kept
    eligible: list[EligiblePair]                # counted independently, same graphs
    graphs: int                         # graphs Dynamo compiled
    seconds: float

    @property
    def tuned(self) -> list[Decision]:
        return [d for d in self.decisions if d.tuned]

    @property
    def skips(self) -> dict[str, int]:
        """Reasons of the pairs left alone (their stable strings), with counts."""
        return tally(self.decisions).skipped_by_reason


@dataclasses.dataclass
class TuneRun:
    """``convbn_pass.tune`` under ``memory``, eagerly, next to eager Eval mode."""

    plan: convbn_pass.TunePlan
    errors: Errors            # of the tuned step against eager Eval mode
    kept_eval: int            # activation bytes of one Eval-mode step
    kept_tuned: int           # the same, tuned
    seconds: float


@dataclasses.dataclass
class ZooRun:
    case: Case
    eager_pairs: list[tuple[str, str]]
    runs: dict[str | None, PolicyRun]
    tune: TuneRun | None                # None where measure() was told not to tune
    seconds: float


def _run_policy(policy: str | None, model: nn.Module, x: torch.Tensor,
                ref: Step) -> PolicyRun:
    start = time.perf_counter()
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    recorder = _Recorder(policy)
    fn = torch.compile(model, backend=recorder)
    step = train_step(fn, model, x)
    model.zero_grad(set_to_none=True)
    saved = convbn_pass.memory.saved_activation_bytes(fn, model, x.detach().requires_grad_(True))
    seen = [key for key, _ in recorder.graphs]
    handed = [(r.compile_id, r.attempt) for r in recorder.rewrites]
    assert handed == seen, f"on_graph saw graphs {handed}, the backend {seen}"
    kept = kept_graphs(seen)
    decisions = [d for r in recorder.rewrites if (r.compile_id, r.attempt) in kept
                 for d in r.decisions]
    eligible = [p for key, pairs in recorder.graphs if key in kept for p in pairs]
    graphs = sum(key in kept for key in seen)
    return PolicyRun(policy, scaled_errors(step, ref), saved, decisions, eligible, graphs,
                     time.perf_counter() - start)


def _run_tune(model: nn.Module, x: torch.Tensor, ref: Step) -> TuneRun:
    """Tune a copy of ``model`` under ``memory`` and step it eagerly."""
    start = time.perf_counter()
    torch._dynamo.reset()
    tuned = copy.deepcopy(model)
    plan = convbn_pass.tune(tuned, (x,), policy="memory")
    step = train_step(tuned, tuned, x)
    tuned.zero_grad(set_to_none=True)
    kept = [convbn_pass.memory.saved_activation_bytes(m, m, x.detach().requires_grad_(True))
            for m in (model, tuned)]
    model.zero_grad(set_to_none=True)
    return TuneRun(plan, scaled_errors(step, ref), *kept, time.perf_counter() - start)


def measure(case: Case, policies: Sequence[str | None] = POLICIES, tune: bool = True) -> ZooRun:
    """Build ``case`` in float64 and run it eagerly, under each policy and (if
    ``tune``) tuned with ``convbn_pass.tune``, all against one eager reference step."""
    start = time.perf_counter()
    model, x = build(case), sample(case)
    pairs = eager_pairs(model, x)
    reference = copy.deepcopy(model)
    ref = train_step(reference, reference, x)
    del reference
    with torch._inductor.config.patch(fx_graph_cache=False):
        runs = {policy: _run_policy(policy, model, x, ref) for policy in policies}
    tuned = _run_tune(model, x, ref) if tune else None
    return ZooRun(case, pairs, runs, tuned, time.perf_counter() - start)


def _measure_by_id(case_id: str, policies: tuple[str | None, ...], tune: bool) -> ZooRun:
    from torch._functorch import config as functorch_config

    # The settings tests_zoo/conftest.py gives every test: no cache may serve a compile
    # (the pass would not run and hand over no graph), room for every graph.
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096), \
            torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):
        run = measure(CASE_IDS[case_id], policies, tune)
    return dataclasses.replace(run, case=None)  # type: ignore[arg-type]  # a Case's factory does not pickle


def measure_fresh(case: Case, policies: Sequence[str | None] = POLICIES,
                  tune: bool = True) -> ZooRun:
    """:func:`measure` in a fresh process (spawned, so nothing is inherited), the
    way the benchmarks time compiles. One long process compiling model after model
    grows and slows down: the same MobileNetV3-Small measurement took 29 s in a
    process of its own and 68 s late in a serial run of the suite, whose process
    had grown to 7 GB (on a machine busy with another run too)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        run = pool.submit(_measure_by_id, case.id, tuple(policies), tune).result()
    return dataclasses.replace(run, case=case)


_RUNS: dict[str, ZooRun] = {}


def zoo_run(case: Case) -> ZooRun:
    """The measurement of ``case`` (:func:`measure_fresh`, every policy and tune),
    made once per process and shared by the light and the eager zoo tests, which
    ``--dist loadgroup`` sends to the same worker (the scheduler in
    ``tests_zoo/conftest.py`` groups tests by model)."""
    if case.id not in _RUNS:
        _RUNS[case.id] = measure_fresh(case)
    return _RUNS[case.id]

