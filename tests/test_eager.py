"""convbn_pass.tune: Tune mode without the compiler.

Numbers in float64 against eager Eval mode (the same model untuned), bytes kept
for backward (saved-tensor hooks) against Deploy mode (``deploy.fold``), every
reason a pair is left alone as a negative whose output stays exact, mode
switches, copies and checkpoints, composition with torch.compile, autocast,
channels_last, DDP and FSDP2.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import convbn_pass
from convbn_pass import Action, backends, deploy, memory, regions, zoo
from convbn_pass.eager import _TuneFunction, _ConvSpec, is_tuned
from helpers import KINDS, Step, block, errors, image_batches, sample, small_resnet
from test_distributed import GLOO_TIMEOUT, _free_port, _full_state
from test_training_setups import AMP_LIMIT, AMP_SEEDS, BatchNormAct2d, VisionFrozenBN, \
    _ratios_over_seeds

TOL = 1e-10
VERSION = pytest.mark.version  # the eager path in the version suite (pytest -m version)
DEVICE = pytest.mark.device    # runs on pytest --device (the GPU run's eager step: -m device)


def tuned(model: nn.Module, x: Any, policy: str = "memory", **kw: Any
          ) -> tuple[nn.Module, convbn_pass.TunePlan]:
    """A tuned deep copy of ``model`` and its plan."""
    model = copy.deepcopy(model)
    return model, convbn_pass.tune(model, (x,), policy=policy, **kw)


def kept(model: nn.Module, x: torch.Tensor, fn: Callable[..., Any] | None = None) -> int:
    """Activation bytes one step of ``fn`` (default: the model) keeps for backward."""
    return memory.saved_activation_bytes(model if fn is None else fn, model, x.detach().requires_grad_(True))


def reasons(plan: convbn_pass.TunePlan) -> list[str]:
    return [str(d.reason) for d in plan.decisions]


def check(model: nn.Module, x: torch.Tensor, policy: str = "memory",
          device: torch.device | str = "cpu") -> convbn_pass.TunePlan:
    """Tune a copy on ``device``; its output and every gradient within TOL of the model
    in Eval mode there."""
    model = model.double().to(device)
    x = x.double().to(device)
    got, plan = tuned(model, x, policy)
    errs = errors(Step(got, x), Step(model, x))
    assert max(errs.values()) <= TOL, errs
    return plan


# --- Every kind of block ---------------------------------------------------------------------

@VERSION
@DEVICE
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_kinds(kind, bias, affine, device):
    plan = check(block(kind, bias=bias, affine=affine), sample(kind), device=device)
    assert reasons(plan) == ["tuned"]


@DEVICE
@pytest.mark.parametrize("policy", ["memory", "keep_weight"])
@pytest.mark.parametrize("kind, kw", [
    ("conv2d", dict(groups=2)),
    ("conv2d", dict(stride=2, dilation=2, padding=2)),
    ("conv_transpose2d", dict(groups=2, stride=2, output_padding=1)),  # channel axis 1, grouped
    ("conv_transpose3d", dict(groups=2, stride=2)),
    ("conv1d", dict(padding=1, padding_mode="reflect")),
    ("conv2d", dict(padding=1, padding_mode="replicate")),
    ("conv2d", dict(padding=1, padding_mode="circular")),
    ("conv3d", dict(padding=1, padding_mode="reflect")),
    ("conv2d", dict(padding="same")),
    ("conv2d", dict(padding="same", kernel_size=4)),  # even kernel: one side padded more
    ("conv2d", dict(padding="same", kernel_size=2, dilation=3, padding_mode="reflect")),
    ("conv1d", dict(padding="valid")),
])
def test_conv_settings(kind, kw, policy, device):
    plan = check(block(kind, **kw), sample(kind), policy, device)
    assert [d.action for d in plan.decisions] == [
        Action.TUNE if policy == "memory" else Action.TUNE_KEEP_WEIGHT]


def test_conv_transpose_output_size():
    """ConvTranspose called with output_size: the output padding it picks is kept."""
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.up(x, output_size=[x.shape[-2] * 2, x.shape[-1] * 2]))

    model = zoo.randomize_bn(Up()).eval()
    plan = check(model, sample("conv2d"))
    assert reasons(plan) == ["tuned"]


# --- The autograd Function against finite differences ------------------------------------------

_SPECS = {
    "conv2d": (_ConvSpec(False, False, (1, 1), (1, 1), (1, 1), (0, 0), 2), (2, 4, 5, 5), (6, 2, 3, 3)),
    "conv_transpose2d": (_ConvSpec(False, True, (2, 2), (0, 0), (1, 1), (1, 1), 2),
                         (2, 4, 3, 3), (4, 3, 2, 2)),
    "conv1d": (_ConvSpec(False, False, (2,), (0,), (2,), (0,), 1), (2, 4, 9), (6, 4, 3)),
    "linear": (_ConvSpec(True, False, (), (), (), (), 1), (3, 4), (6, 4)),
}


@pytest.mark.parametrize("keep_weight", [False, True], ids=["rebuild", "keep_weight"])
@pytest.mark.parametrize("kind", sorted(_SPECS))
def test_function_gradcheck(kind, keep_weight):
    spec, x_shape, w_shape = _SPECS[kind]
    gen = torch.Generator().manual_seed(0)
    c_out = w_shape[1] * spec.groups if spec.transposed else w_shape[0]

    def rand(*shape: int, positive: bool = False) -> torch.Tensor:
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        return (t + 0.5 if positive else t - 0.5).requires_grad_(True)

    x, w, b = rand(*x_shape), rand(*w_shape), rand(c_out)
    gamma, beta = rand(c_out, positive=True), rand(c_out)
    mean, var = rand(c_out).detach(), rand(c_out, positive=True).detach()

    def fn(*t: torch.Tensor) -> torch.Tensor:
        return _TuneFunction.apply(*t, mean, var, 1e-3, spec, keep_weight)

    assert torch.autograd.gradcheck(fn, (x, w, b, gamma, beta))


# --- Memory: Deploy mode's bytes ----------------------------------------------------------------

def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "resnet": (zoo.ResNet(zoo.Bottleneck, [1, 1, 1, 1], num_classes=4, width=8), (2, 3, 32, 32)),
        "mobilenet_v2": (zoo.MobileNetV2(num_classes=4, width=0.25), (2, 3, 32, 32)),
        "unet": (zoo.UNet(width=4), (2, 3, 32, 32)),
        "mlp_bn": (zoo.MLPBN(16, 32, 2), (4, 16)),
    }


MODELS = sorted(_models())


def _model(name: str, device: torch.device | str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    model, shape = _models()[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return zoo.randomize_bn(model).eval().double().to(device), x.to(device)


@VERSION
@DEVICE
@pytest.mark.parametrize("name", MODELS)
def test_memory_keeps_deploy_bytes(name, device):
    model, x = _model(name, device)
    got, plan = tuned(model, x, "memory")
    assert plan.tuned and not plan.skipped
    folded = deploy.fold(model, x)
    assert kept(got, x) == kept(folded, x) < kept(model, x)
    assert max(errors(Step(got, x), Step(model, x)).values()) <= TOL


@pytest.mark.parametrize("name", ["resnet", "unet", "mlp_bn"])
def test_keep_weight_keeps_one_weight_more_per_block(name):
    model, x = _model(name)
    got, plan = tuned(model, x, "keep_weight")
    weights = sum(got.get_submodule(d.conv).weight.nbytes for d in plan.tuned)
    assert kept(got, x) == kept(deploy.fold(model, x), x) + weights


@pytest.mark.parametrize("name", MODELS)
def test_auto_decides_as_the_compiled_pass(name):
    """``auto`` makes the compiled pass's choice for every pair (core.policy.decide on
    the same candidates), and never keeps more than Eval mode."""
    model, x = _model(name)
    got, plan = tuned(model, x, "auto")
    graphs: list[convbn_pass.GraphRewrite] = []
    torch.compile(copy.deepcopy(model), backend=backends.light("auto", on_graph=graphs.append))(x)
    compiled = [(d.conv, d.bn, d.action) for g in graphs for d in g.decisions]
    assert [(d.conv, d.bn, d.action) for d in plan.decisions] == compiled
    assert kept(got, x) <= kept(model, x)


# --- Soundness: pairs left alone, outputs exact ---------------------------------------------------

class _Net(nn.Module):
    """conv → BN pairs wired by ``route``, to build each negative in a line."""

    def __init__(self, route: Callable[["_Net", torch.Tensor], Any], c: int = 4) -> None:
        super().__init__()
        self.route = route
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> Any:
        return self.route(self, x)


class _FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.weight, padding=1))


class _StandardisedConv(nn.Conv2d):
    """A forward of its own that convolves with another weight than ``self.weight``
    (weight standardisation, as timm's StdConv2d): tuning it by the module's weight
    would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _TrainingBN(nn.BatchNorm2d):
    """Always batch statistics, whatever the mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            True, 0.0, self.eps)


def _linear_3d() -> nn.Module:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 5), nn.BatchNorm1d(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x))  # [N, 5, 5]: BatchNorm1d normalises axis 1
    return M()


NEGATIVES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    # the conv output has a second user
    "conv_second_user": (lambda: _Net(lambda m, x: (lambda y: m.bn(y) + y)(m.conv(x))),
                         (2, 4, 6, 6), ["conv_multi_user"]),
    # the conv module is called twice, each output read by the BN
    "conv_called_twice": (lambda: _Net(lambda m, x: m.bn(m.conv(x)) + m.bn2(m.conv(x))),
                          (2, 4, 6, 6), ["module_reused", "module_reused"]),
    # the BN also normalises something other than its conv's output
    "bn_called_twice": (lambda: _Net(lambda m, x: m.bn(m.conv(x)) + m.bn(x)),
                        (2, 4, 6, 6), ["module_reused"]),
    # the BN reads a sum, not the conv output: no candidate at all
    "bn_of_other_tensor": (lambda: _Net(lambda m, x: m.bn(m.conv(x) + x)), (2, 4, 6, 6), []),
    # a functional conv inside a module of its own
    "functional_conv": (_FunctionalConv, (2, 4, 6, 6), ["not_module"]),
    # a frozen BN class tune does not know (here a copy of torchvision's)
    "unknown_frozen_bn": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3), VisionFrozenBN(4)),
                          (2, 4, 6, 6), ["not_module"]),
    "conv_own_forward": (lambda: nn.Sequential(_StandardisedConv(4, 4, 3), nn.BatchNorm2d(4)),
                         (2, 4, 6, 6), ["custom_forward"]),
    "bn_batch_stats": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3), _TrainingBN(4)),
                       (2, 4, 6, 6), ["bn_training"]),
    "no_running_stats": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3),
                                               nn.BatchNorm2d(4, track_running_stats=False)),
                         (2, 4, 6, 6), ["no_running_stats"]),
    "linear_3d": (_linear_3d, (2, 5, 4), ["linear_axis"]),
}


@VERSION
@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_left_alone_and_exact(name):
    factory, shape, expected = NEGATIVES[name]
    torch.manual_seed(0)
    model = zoo.randomize_bn(factory()).eval().double()
    x = torch.randn(shape, dtype=torch.float64)
    got, plan = tuned(model, x)
    assert reasons(plan) == expected
    assert all(d.action is Action.SKIP for d in plan.decisions)
    assert not is_tuned(got)
    ref, step = Step(model, x), Step(got, x)
    assert torch.equal(step.out, ref.out)
    assert all(torch.equal(step.grads[k], g) for k, g in ref.grads.items() if g is not None)


def test_policy_eval_under_auto():
    """A late-stage block whose weight outweighs its activation stays in Eval mode."""
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
    model = zoo.randomize_bn(model).eval().double()
    x = torch.randn(1, 64, 2, 2, dtype=torch.float64)
    got, plan = tuned(model, x, "auto")
    assert reasons(plan) == ["policy_eval"]
    assert torch.equal(got(x), model(x))


class _Branchy(nn.Module):
    """A data-dependent Python branch (a graph break) between two pairs, and a third
    pair after it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.c = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if y.mean() > 0.5:  # data-dependent: Dynamo breaks the graph here
            y = y * 2
        return self.c(self.b(y))


@pytest.mark.parametrize("shift", [0.0, 3.0], ids=["branch_not_taken", "branch_taken"])
def test_pairs_after_a_graph_break(shift):
    torch.manual_seed(0)
    model = zoo.randomize_bn(_Branchy()).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got, plan = tuned(model, x)
    assert [d.graph for d in plan.decisions] == [1, 2, 2]
    assert reasons(plan) == ["tuned"] * 3
    x2 = x + shift
    assert max(errors(Step(got, x2), Step(model, x2)).values()) <= TOL


@VERSION
def test_blocks_past_dynamos_recompile_limit():
    """zoo.RoutedNet: a loop dispatches 12 blocks with a data-dependent choice between
    them; Dynamo compiles the block forward once per block (each has its own dilation),
    and past its limit of 8 runs the rest eagerly. The trace has a budget of its own:
    every block is tuned, exactly. The stem runs in the root frame Dynamo skips: seen
    running, never traced, so it stays in Eval mode with its reason."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(zoo.RoutedNet(depth=12, width=4)).eval().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch._dynamo.config.patch(recompile_limit=8):  # Dynamo's default
        got, plan = tuned(model, x)
    assert [(d.conv, str(d.reason)) for d in plan.decisions] == [
        *((f"blocks.{i}.conv", "tuned") for i in range(12)), ("stem.0", "not_traced")]
    assert max(errors(Step(got, x), Step(model, x)).values()) <= TOL
    # Deploy folds the same 12 pairs (not the stem): the floor for what is tuned.
    assert deploy.pairs(model, x) == [(f"blocks.{i}.conv", f"blocks.{i}.bn") for i in range(12)]
    assert kept(got, x) == kept(deploy.fold(model, x), x) < kept(model, x)


def test_data_flow_unlike_the_trace_raises():
    """A forward that sends a tuned conv's output past its BatchNorm raises, rather
    than returning the normalised tensor as if it were the conv's."""
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.use_bn = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) if self.use_bn else y

    model = zoo.randomize_bn(Skip()).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    got, plan = tuned(model, x)
    assert reasons(plan) == ["tuned"]
    got.use_bn = False
    with pytest.raises(RuntimeError, match="did not reach 'bn'"):
        got(x)
    got.use_bn = True  # and the next forward is a sound one again
    torch.testing.assert_close(got(x), model(x), rtol=TOL, atol=0)


# --- Modes at run time -----------------------------------------------------------------------------

@VERSION
def test_train_then_eval():
    """train(): exactly Train mode (batch statistics, running statistics updated);
    eval() again: Tune mode, without tuning again."""
    model, x = _model("resnet")
    got, plan = tuned(model, x)
    floor = kept(got, x)
    ref = copy.deepcopy(model)
    got.train()
    ref.train()
    a, b = Step(got, x), Step(ref, x)
    assert torch.equal(a.out, b.out)
    assert all(torch.equal(a.grads[k], g) for k, g in b.grads.items())
    for (name, mine), (_, theirs) in zip(a.model.named_buffers(), b.model.named_buffers()):
        assert torch.equal(mine, theirs), name
    # Step ran on copies; the running statistics move the same way here too.
    got(x), ref(x)
    assert all(torch.equal(p, q) for p, q in zip(got.buffers(), ref.buffers()))
    got.eval()
    ref.eval()
    assert kept(got, x) == floor < kept(ref, x)
    assert max(errors(Step(got, x), Step(ref, x)).values()) <= TOL


def test_tuned_while_in_training_mode():
    """tune() traces with BatchNorms in eval mode, whatever mode the model is in
    (MMEngine's option is switched on when the model is built, in training mode)."""
    model, x = _model("resnet")
    got = copy.deepcopy(model).train()
    plan = convbn_pass.tune(got, (x,), policy="memory")
    assert plan.tuned and got.training
    assert all(m.training for m in got.modules())
    got.eval()
    assert kept(got, x) == kept(deploy.fold(model, x), x)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_as_without_tune(context):
    model, x = _model("resnet")
    got, _ = tuned(model, x)
    with context():
        assert torch.equal(got(x), model(x))


def test_frozen_bn_parameters():
    """BatchNorm parameters with requires_grad=False (a frozen backbone) get no
    gradient; everything else is Eval mode's."""
    model, x = _model("resnet")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    got, _ = tuned(model, x)
    a, b = Step(got, x), Step(model, x)
    assert max(errors(a, b).values()) <= TOL
    assert all(p.grad is None for m in a.model.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())


class _BNThenAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: the BatchNorm, then an activation, in one forward."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


@pytest.mark.parametrize("norm", [_BNThenAct, BatchNormAct2d], ids=["bn_then_act", "bn_act_2d"])
def test_batchnorm_with_activation(norm):
    """The BatchNorm's normalisation is skipped, its activation is not."""
    torch.manual_seed(0)
    model = zoo.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), norm(4))).eval()
    plan = check(model, torch.randn(2, 3, 8, 8))
    assert reasons(plan) == ["tuned"]


# --- State: names, checkpoints, copies, untune --------------------------------------------------

def test_names_state_dict_and_load():
    model, x = _model("resnet")
    got, _ = tuned(model, x)
    assert [n for n, _ in got.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(got.state_dict()) == list(model.state_dict())
    other = zoo.randomize_bn(_models()["resnet"][0], seed=3).eval().double()
    got.load_state_dict(other.state_dict())
    assert max(errors(Step(got, x), Step(other, x)).values()) <= TOL


def test_deepcopy_is_an_independent_tuned_model():
    """An EMA-style copy: its BatchNorm statistics are its own, and it is tuned."""
    model, x = _model("resnet")
    got, _ = tuned(model, x)
    twin = copy.deepcopy(got)
    with torch.no_grad():
        for module in twin.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.mul_(2.0)
                module.weight.add_(0.25)
    changed = copy.deepcopy(model)
    changed.load_state_dict(twin.state_dict())
    assert max(errors(Step(twin, x), Step(changed, x)).values()) <= TOL
    assert max(errors(Step(got, x), Step(model, x)).values()) <= TOL
    assert is_tuned(twin) and kept(twin, x) == kept(got, x)


def test_untune_restores_stock_forwards():
    model, x = _model("resnet")
    got, plan = tuned(model, x)
    assert convbn_pass.untune(got) == tuple((d.conv, d.bn) for d in plan.tuned)
    assert not is_tuned(got)
    assert not any("forward" in m.__dict__ for m in got.modules())
    assert not got._forward_hooks and not got._forward_pre_hooks
    assert kept(got, x) == kept(model, x)
    assert torch.equal(got(x), model(x))
    assert convbn_pass.tune(got, (x,)).tuned  # and it can be tuned again


@pytest.mark.parametrize("modules, expected", [
    (["layer1"], {"layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3",
                  "layer1.0.downsample.0"}),
    (["conv1", "bn1", "layer4.0.downsample"], {"conv1", "layer4.0.downsample.0"}),
    (["conv1"], set()),  # a pair is in scope with both its modules
    (zoo.Bottleneck, None),  # every block, not the stem
])
def test_modules_limit(modules, expected):
    model, x = _model("resnet")
    got, plan = tuned(model, x, modules=modules)
    convs = {d.conv for d in plan.tuned}
    if expected is None:
        expected = {d.conv for d in tuned(model, x)[1].tuned} - {"conv1"}
    assert convs == expected
    assert max(errors(Step(got, x), Step(model, x)).values()) <= TOL


# --- Bad input: one clear error, nothing applied -------------------------------------------------

def _untouched(model: nn.Module) -> bool:
    return not is_tuned(model) and not any(
        "forward" in m.__dict__ or "_convbn_tune" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("call, error, match", [
    (lambda m, x: convbn_pass.tune(lambda t: t, (x,)), TypeError, "takes a torch.nn.Module"),
    (lambda m, x: convbn_pass.tune(m, (x[:, :2],)), ValueError, "rejects the example inputs"),
    (lambda m, x: convbn_pass.tune(m, (x,), policy="fast"), ValueError, "unknown policy"),
    (lambda m, x: convbn_pass.tune(m, (x,), ratio=0), ValueError, "ratio"),
    (lambda m, x: convbn_pass.tune(m, (x,), modules=["layer9"]), ValueError, "no submodule"),
    (lambda m, x: convbn_pass.tune(m, (x,), modules="layer1"), ValueError, "list of module"),
    (lambda m, x: convbn_pass.tune(m, (x,), modules=nn.GroupNorm), ValueError, "no module of"),
    (lambda m, x: convbn_pass.tune(torch.compile(m), (x,)), ValueError, "torch.compile"),
    (lambda m, x: convbn_pass.untune(3), TypeError, "takes a torch.nn.Module"),
], ids=["not_a_module", "inputs_rejected", "policy", "ratio", "unknown_path", "path_string",
        "no_such_class", "compiled", "untune_not_a_module"])
def test_bad_input(call, error, match):
    model, x = _model("resnet")
    with pytest.raises(error, match=match):
        call(model, x)
    assert _untouched(model)


def test_tune_twice_raises():
    model, x = _model("resnet")
    got, _ = tuned(model, x)
    with pytest.raises(ValueError, match="already tuned"):
        convbn_pass.tune(got, (x,))
    with pytest.raises(ValueError, match="already tuned"):
        convbn_pass.tune(got.layer1, (torch.randn(1, 8, 8, 8, dtype=torch.float64),))


def test_tune_region_compiled_raises():
    model, x = _model("resnet")
    regions.compile_regions(model, (x,), backend=backends.light("memory"))
    with pytest.raises(ValueError, match="compile_regions"):
        convbn_pass.tune(model, (x,))
    assert not is_tuned(model)


# --- Composition ---------------------------------------------------------------------------------

@VERSION
@pytest.mark.parametrize("policy", ["memory", "keep_weight"])
@pytest.mark.parametrize("name", ["resnet", "unet"])
def test_compile_a_tuned_model(name, policy):
    """torch.compile traces the tuned blocks; the pass finds no pair left to tune,
    and the bytes are those of compiling the untuned model with the pass."""
    model, x = _model(name)
    got, _ = tuned(model, x, policy)
    graphs: list[convbn_pass.GraphRewrite] = []
    fn = torch.compile(got, backend=backends.light(policy, on_graph=graphs.append))
    assert max(errors(Step(got, x, lambda m: torch.compile(m, backend=backends.light(policy))),
                      Step(model, x)).values()) <= TOL
    compiled_tuned = kept(got, x, fn)
    assert graphs and not any(d.tuned for g in graphs for d in g.decisions)
    plain = copy.deepcopy(model)
    with_pass = kept(plain, x, torch.compile(plain, backend=backends.light(policy)))
    assert compiled_tuned <= with_pass


@pytest.mark.inductor
@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_inductor_compile_a_tuned_model(kind):
    """Through Inductor too: Eval's numbers, the bytes of the pass on the untuned block."""
    model, x = block(kind).double(), sample(kind, dtype=torch.float64)
    got, _ = tuned(model, x)
    opts = {"fx_graph_cache": False}
    assert max(errors(Step(got, x, lambda m: torch.compile(m, options=opts)),
                      Step(model, x)).values()) <= TOL
    plain = copy.deepcopy(model)
    with_pass = kept(plain, x, torch.compile(plain, options=convbn_pass.options("memory", **opts)))
    assert kept(got, x, torch.compile(got, options=opts)) <= with_pass


def _lazy_tune(policy: str) -> Callable[[nn.Module], Callable[..., Any]]:
    """A ``compile_fn`` for test_training_setups' autocast judge: tunes on the first call."""
    def make(model: nn.Module) -> Callable[..., Any]:
        def fn(x: torch.Tensor) -> Any:
            if not is_tuned(model):
                with torch.autocast("cpu", enabled=False):
                    convbn_pass.tune(model, (x.detach(),), policy=policy)
            return model(x)
        return fn
    return make


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d", "linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_error_no_worse_than_without_tune(kind, dtype):
    """Judged as the compiled pass is: per quantity, the median over draws of the
    error against float64 with tune over the error without."""
    medians = _ratios_over_seeds(kind, AMP_SEEDS, lambda p: None if p is None else _lazy_tune(p),
                                 dtype=dtype)
    worse = {k: round(v, 3) for k, v in medians.items() if v > AMP_LIMIT}
    assert not worse, worse


@pytest.mark.parametrize("keep_weight", [False, True], ids=["memory", "keep_weight"])
@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d", "linear"])
def test_autocast_input_without_grad(kind, keep_weight):
    """A first layer's input needs no gradient: backward computes dW′ alone, the
    same as when the input's gradient is wanted too."""
    model = block(kind)
    got, _ = tuned(model, sample(kind), "keep_weight" if keep_weight else "memory")
    grads = []
    for needs in (False, True):
        x = sample(kind).requires_grad_(needs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = got(x)
        out.float().square().sum().backward()
        grads.append([p.grad.clone() for p in got.parameters()])
        got.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@DEVICE
@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_channels_last(kind, device):
    model = block(kind).double().to(device, memory_format=torch.channels_last)
    x = sample(kind, dtype=torch.float64, device=device).contiguous(
        memory_format=torch.channels_last)
    got, plan = tuned(model, x)
    a, b = Step(got, x), Step(model, x)
    assert reasons(plan) == ["tuned"]
    assert max(errors(a, b).values()) <= TOL
    assert a.out.stride() == b.out.stride()


# --- DDP and FSDP2 after tune (gloo, two processes) ----------------------------------------------

WORLD = 2
STEPS = 3


def _train(model: nn.Module, fn: Callable[..., Any], rank: int, world: int,
           measure: bool = True) -> dict[str, Any]:
    """SGD steps on this rank's share of each batch; the state after, and the
    activation bytes of each step (``measure``: not under FSDP2, whose sharded
    parameters are other tensors while a module runs)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kept_bytes = []
    for x in image_batches(STEPS):
        part = x.chunk(world)[rank]
        exclude = [*model.parameters(), *model.buffers(), part] if measure else []
        with memory.SavedTensors(exclude) as saved:
            loss = fn(part).square().mean()  # DDP averages the per-rank means
        kept_bytes.append(saved.bytes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"state": _full_state(model), "kept": kept_bytes}


def _dist_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=GLOO_TIMEOUT)
    torch.set_num_threads(1)
    try:
        found = {}
        model = small_resnet()
        plan = convbn_pass.tune(model, (image_batches(STEPS)[0].chunk(WORLD)[rank],), policy="memory")
        ddp = nn.parallel.DistributedDataParallel(model)
        found["ddp"] = {**_train(model, ddp, rank, WORLD), "tuned": len(plan.tuned)}
        model = small_resnet()
        plan = convbn_pass.tune(model, (image_batches(STEPS)[0].chunk(WORLD)[rank],), policy="memory")
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            fully_shard(layer)
        fully_shard(model)
        found["fsdp"] = {"state": _train(model, model, rank, WORLD, False)["state"],
                         "tuned": len(plan.tuned)}
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict[str, Any]:
    out = str(tmp_path_factory.mktemp("eager_dist") / "rank")
    mp.spawn(_dist_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    reference = small_resnet()
    single = _train(reference, reference, 0, 1)
    half = small_resnet()
    convbn_pass.tune(half, (image_batches(STEPS)[0].chunk(WORLD)[0],), policy="memory")
    return {"ranks": [torch.load(f"{out}.{r}") for r in range(WORLD)], "single": single,
            "half_kept": _train(half, half, 0, WORLD)["kept"]}


@pytest.mark.parametrize("rank", range(WORLD))
@pytest.mark.parametrize("arrangement", ["ddp", "fsdp"])
def test_distributed_after_tune(distributed, arrangement, rank):
    """Parameters after 3 SGD steps equal one process's, every pair tuned per rank."""
    run = distributed["ranks"][rank][arrangement]
    want = distributed["single"]["state"]
    assert run["tuned"] == 17
    assert run["state"].keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(run["state"][name], value, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_keeps_one_process_bytes(distributed, rank):
    """Under DDP each rank keeps what one tuned process keeps for the same half batch."""
    assert distributed["ranks"][rank]["ddp"]["kept"] == distributed["half_kept"]
