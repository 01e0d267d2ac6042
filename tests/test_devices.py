"""Devices: pnc runs where the models are (issue 11, item 6).

This machine has no GPU, so the tests show that nothing is pinned to the CPU in three ways:

* **meta**: models and inputs on the ``meta`` device (shapes, no values) for every
  computation that needs no values; the outputs must come back on ``meta``;
* **foreign default device**: CPU models run with ``torch.device("meta")`` as the default
  device and a dispatch mode that records every tensor any op makes: a tensor pnc creates
  without following its inputs lands on ``meta`` and is reported (or breaks the run), so
  the results must equal a plain run and no tensor may be off the CPU;
* **AST**: every tensor factory call in pnc's source passes ``device=``, or is allowed here
  with its reason; no ``"cpu"`` device is written out unless allowed here with its reason.
"""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


# --- the AST check --------------------------------------------------------------------------

FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "rand",
    "randn",
    "randint",
    "randperm",
    "arange",
    "eye",
    "tensor",
    "as_tensor",
    "linspace",
}
PACKAGES = ("surgery", "adapters", "zoo", "benchmarks")
#: (file, enclosing function, factory or "cpu") -> why that call may leave out device= / name the CPU
ALLOWED = {
    ("adapters/tokens.py", "_prefix_param", "zeros"): "built inside make_adapter's `with device:` block",
    ("zoo/imagefolder.py", "files", "tensor"): "datasets live on the CPU; batches move as they are used",
    ("zoo/imagefolder.py", "index_image_folder", "zeros"): "datasets live on the CPU; batches move as they are used",
    ("zoo/imagefolder.py", "index_image_folder", "ones"): "datasets live on the CPU; batches move as they are used",
    ("adapters/init.py", "least_squares_init", "cpu"): "LAPACK's gelsd solve exists on the CPU only (MPS: no float64)",
    ("surgery/devices.py", "float64_device", "cpu"): "Apple MPS has no float64",
    ("surgery/devices.py", "cpu_copy", "cpu"): "files and ONNX are made from CPU tensors",
    ("zoo/train.py", "train_zoo_model", "cpu"): "seeded initial weights: drawn on the CPU, the same on every device",
    ("benchmarks/baselines.py", "extend_classifier", "cpu"): "seeded new rows: drawn on the CPU, then moved",
    ("benchmarks/baselines.py", "_reinitialized", "cpu"): "seeded re-initialisation: drawn on the CPU, then moved",
    ("benchmarks/machine.py", "speed_probe", "cpu"): "the speed probe measures this machine's CPU",
}


def _is_cpu(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value == "cpu"


def _offences(path: Path) -> Iterator[tuple[str, str, int]]:
    """(enclosing function, factory name or "cpu", line) of every factory call without device=
    and every "cpu" written as a device in the file at ``path``."""
    tree = ast.parse(path.read_text())
    parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}

    def function(node: ast.AST) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return "<module>"

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_torch = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "torch"
        device = next((k.value for k in node.keywords if k.arg == "device"), None)
        if is_torch and func.attr in FACTORIES and device is None:
            yield function(node), func.attr, node.lineno
        elif _is_cpu(device) or (
            isinstance(func, ast.Attribute)
            and ((is_torch and func.attr == "device") or func.attr == "to")
            and node.args
            and _is_cpu(node.args[0])
        ):
            yield function(node), "cpu", node.lineno


def _sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "results" not in p.parts]


def test_every_tensor_factory_follows_a_device():
    bad, used = [], set()
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for func, what, line in _offences(path):
            key = (rel, func, what)
            if key in ALLOWED:
                used.add(key)
                continue
            bad.append(f"{rel}:{line} in {func}(): " + ("a 'cpu' device" if what == "cpu" else f"torch.{what}()"))
    assert not bad, "pass device= (the inputs' or the model's), or allow it in ALLOWED with a reason:\n" + "\n".join(
        bad
    )
    assert set(ALLOWED) <= used, f"stale ALLOWED entries: {sorted(set(ALLOWED) - used)}"


def test_the_ast_check_sees_what_it_must(tmp_path):
    source = (
        "import torch\n"
        "def f(x):\n"
        "    a = torch.zeros(3)\n"
        "    b = torch.arange(4, device=x.device)\n"
        "    c = torch.tensor([1], device='cpu')\n"
        "    return x.to('cpu'), torch.device('cpu'), torch.full((2,), 1.0)\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    found = sorted(_offences(path))
    assert found == [("f", "cpu", 5), ("f", "cpu", 6), ("f", "cpu", 6), ("f", "full", 6), ("f", "zeros", 3)]


# --- resolving and finding devices ------------------------------------------------------------


def test_resolve_device_names_what_this_machine_has():
    from pnc.surgery.devices import available_devices, resolve_device
    from pnc.surgery.errors import DeviceError

    have = available_devices()
    assert have[0] == "cpu"
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(META) is META
    assert resolve_device("auto") == torch.device(have[1] if len(have) > 1 else "cpu")
    for name in ("gpu", "", "cuda:x", "cuda:-1", "cpu:0", "meta"):
        with pytest.raises(DeviceError, match="expected cpu, cuda, cuda:N, mps or auto"):
            resolve_device(name)
    with pytest.raises(DeviceError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}", "--device")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == torch.device("cuda", 0)
    else:
        with pytest.raises(DeviceError, match=f"sees no CUDA device; use --device {' or '.join(have)}$"):
            resolve_device("cuda", "--device")
    if "mps" in have:
        assert resolve_device("mps") == torch.device("mps")
    else:
        with pytest.raises(DeviceError, match="no Apple MPS device; use one of cpu"):
            resolve_device("mps")


def test_device_of_a_module():
    from pnc.surgery.devices import cpu_copy, device_of, float64_device
    from pnc.surgery.errors import DeviceError

    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(nn.Linear(2, 2, device=META)) == META
    assert device_of(nn.BatchNorm1d(3).to(META)) == META  # buffers count too
    with torch.device(META):
        assert device_of(nn.ReLU()) == META  # no tensor at all: torch's default device
    split = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device=META))
    with pytest.raises(DeviceError, match=r"split across devices \(cpu, meta\)"):
        device_of(split)
    model = nn.Linear(2, 2)
    assert cpu_copy(model) is model
    assert float64_device(torch.device("mps")) == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_adam_is_fused_where_torch_has_the_kernel():
    """pnc's Adam: fused on the CPU (the same update as the per-tensor loop, to float
    rounding), the per-tensor loop on a device without a fused kernel (meta)."""
    from pnc.surgery.devices import adam

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    fused = adam(models[0].parameters(), lr=0.1)
    loop = torch.optim.Adam(models[1].parameters(), lr=0.1)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randn(5, 3, 4, 4)
    for _ in range(3):
        for model, opt in zip(models, (fused, loop)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert all(not torch.allclose(before[k], v) for k, v in models[0].state_dict().items())
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    on_meta = adam(nn.Linear(2, 2, device=META).parameters(), lr=0.1)
    assert not on_meta.defaults["fused"]


def test_adam_weight_decay_is_decoupled():
    """``adam(..., weight_decay=w)`` is AdamW's update (the decay does not pass through the
    moments): with a zero gradient only the decay moves a weight, by lr * w of it per step."""
    from pnc.surgery.devices import adam

    weight = nn.Parameter(torch.full((4,), 2.0))
    opt = adam([weight], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        weight.grad = torch.zeros(4)
        opt.step()
    torch.testing.assert_close(weight.detach(), torch.full((4,), 2.0 * (1 - 0.1 * 0.5) ** 3))


# --- shape-only computations on the meta device ---------------------------------------------------


def _meta_cnn(classes: int, seed: int) -> nn.Module:
    from pnc.surgery.examples import tiny_cnn

    return tiny_cnn(classes, seed).to(META)


def test_local_models_run_on_the_models_device():
    from pnc.surgery.local_models import (
        LocalModelSet,
        occlude,
        occlusion_masks,
        perturbed_logits,
        solve_local_models,
    )

    cpu_masks = occlusion_masks(8, 4, seed=0)
    masks = occlusion_masks(8, 4, seed=0, device=META)
    assert masks.device == META and masks.shape == cpu_masks.shape
    images = torch.randn(5, 1, 8, 8)  # on the CPU, like a dataset
    targets = perturbed_logits(_meta_cnn(2, 1), images, cpu_masks, [1])
    assert targets.device == META and targets.shape == (5, 8, 1)
    coef = solve_local_models(masks, targets)
    assert coef.device == META and coef.shape == (5, 17, 1)
    g = LocalModelSet(masks, coef, torch.arange(5, device=META))
    assert g.predict(masks).device == META and g.predict(masks).shape == (5, 8, 1)
    which = torch.tensor([0, 4, 2], device=META)
    assert g.predict(masks[:3], which=which).shape == (3, 1)
    assert occlude(images.to(META), masks[:5]).device == META


def test_heads_and_adapters_are_made_on_the_device_asked():
    from pnc.adapters import make_adapter
    from pnc.surgery.branch import ExtendedHead

    head = ExtendedHead(4, 6, 3, 2, device=META)
    correction, new = head(torch.zeros(5, 4, device=META), torch.zeros(5, 6, device=META))
    assert correction.device == new.device == META and (correction.shape, new.shape) == ((5, 3), (5, 2))
    assert head.keep_branch_features(torch.tensor([0, 2, 5])).old.weight.device == META  # CPU indices
    assert ExtendedHead.from_state(head.state_dict()).new.weight.device == META
    pairs = [
        ((4, 6, 6), "NCHW", (4, 6, 6), "NCHW", {}),
        ((4, 6, 6), "NCHW", (8, 3, 3), "NCHW", {}),
        ((4, 6, 6), "NCHW", (5, 16), "NLC", {"dst_prefix_tokens": 1}),
        ((5, 16), "NLC", (8, 3, 3), "NCHW", {"src_prefix_tokens": 1}),
        ((5, 16), "NLC", (10, 12), "NLC", {"src_prefix_tokens": 1, "dst_prefix_tokens": 1}),
        ((6, 6, 4), "NHWC", (4, 6, 6), "NCHW", {}),
        ((7,), "NC", (3,), "NC", {}),
    ]
    for src, src_layout, dst, dst_layout, extra in pairs:
        adapter = make_adapter(src, src_layout, dst, dst_layout, device=META, **extra)
        assert {p.device for p in adapter.parameters()} == {META}, adapter
        out = adapter(torch.zeros(2, *src, device=META))
        assert out.device == META and out.shape == (2, *dst), adapter
    same = make_adapter((4, 6, 6), "NCHW", (4, 6, 6), "NCHW", device=META)
    same.identity_init()
    assert same.channel_map()[0].device == META


def test_a_cloned_network_runs_where_it_is_moved():
    import copy

    from pnc.surgery.examples import tiny_clone

    net, target, _, images = tiny_clone()
    spare = copy.deepcopy(net)
    net.to(META)
    x = images.to(META)
    assert net(x).device == META and net(x).shape == (16, 4)
    with net.disabled():
        assert net(x).device == META and net(x).shape == (16, 3)
    net.detach("src")
    net.add_branch("src", spare.detach("src"))  # a CPU branch joins a meta target: moved to it
    assert {p.device for p in net.branches["src"].parameters()} == {META}
    assert net(x).shape == (16, 4)


def test_evaluation_moves_the_batches_to_the_model():
    from pnc.bench.baselines import CalibratedEnsemble, DirectEnsemble, TargetAlone
    from pnc.bench.metrics import device_for, inference_macs, logits_of
    from pnc.surgery.examples import tiny_cnn
    from pnc.zoo.datasets import ImageData
    from pnc.zoo.train import predict_logits

    target, source = _meta_cnn(3, 0), _meta_cnn(2, 1)
    x = torch.randn(7, 1, 8, 8)  # CPU data
    for model, width in (
        (target, 3),
        (TargetAlone(target, 2), 5),
        (DirectEnsemble(target, source, [1]), 4),
        (CalibratedEnsemble(target, source, [0, 1], 3), 5),
    ):
        assert device_for(model, x) == META
        logits = logits_of(model, x, batch_size=3)
        assert logits.device == META and logits.shape == (7, width)
    assert device_for(lambda v: v, x) == x.device and device_for(target, x, "cpu") == torch.device("cpu")
    assert predict_logits(target, ImageData(x, torch.zeros(7, dtype=torch.long))).device == META
    assert inference_macs(target, x) == inference_macs(tiny_cnn(3, 0), x) > 0


# --- value computations on CPU models, with a foreign default device ------------------------------


class _OffCpu(TorchDispatchMode):
    """Records every op whose output holds a tensor off the CPU."""

    def __init__(self, found: list[str]):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in pytree.tree_leaves(out)):
            self.found.append(str(func))
        return out


@contextlib.contextmanager
def foreign_default_device() -> Iterator[None]:
    """Run a block of CPU computations with ``meta`` as torch's default device; fail if any op
    made a tensor off the CPU (a factory that followed the default device, not the inputs)."""
    found: list[str] = []
    with torch.device(META), _OffCpu(found):
        yield
    assert not found, f"tensors made off the models' device by: {sorted(set(found))}"


def test_foreign_default_device_is_caught():
    with pytest.raises(AssertionError, match="aten.zeros"):
        with foreign_default_device():
            torch.zeros(2)
    with foreign_default_device():
        torch.zeros(2, device="cpu") + torch.ones(2, device="cpu").new_ones(2)


def _same(a, b) -> bool:
    """Equal nested results: tensors bit for bit (and on the same device), dicts by key."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.device == b.device and torch.equal(a, b)
    return a == b


def test_g_masks_and_localization_follow_the_models(tmp_path):
    from pnc.surgery.cuts import cut_points
    from pnc.surgery.examples import tiny_pair
    from pnc.surgery.local_models import fit_local_models
    from pnc.surgery.localization import LocalizeConfig, group_sizes, localize, masked_suffix, pruned_suffix
    from pnc.surgery.tracing import default_input, trace

    _, source, images, _ = tiny_pair()
    config = LocalizeConfig(keep=0.5, steps=3, batch_size=8)

    def run():
        g = fit_local_models(source, images, [1], num_masks=8, cache_dir=tmp_path)
        cached = fit_local_models(source, images, [1], num_masks=8, cache_dir=tmp_path)
        traced = trace(source, images[:2])
        cut = next(c for c in cut_points(traced, verify=False) if c.node == "relu")
        prefix, body, head = masked_suffix(traced, cut)
        keep, masked = localize(body, prefix, images, [1], g, config, frozen=[head])
        example = prefix(images[:4])
        pruned = pruned_suffix(traced, cut, keep, example)
        sizes = group_sizes(body, example, "NCHW", [head])
        return g.coef, cached.coef, g.index, keep, masked.keep_penalty(0.5), pruned(example), sizes

    plain = run()
    with foreign_default_device():
        watched = run()
        default_input(source, (1, 8, 8))
    assert _same(plain, watched)


def test_channel_masks_follow_the_body():
    from pnc.surgery.channel_groups import MaskedBody

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    example = torch.randn(2, 4, 6, 6)

    def run():
        masked = MaskedBody(body, example, "NCHW", frozen=[body[4]])
        soft = masked(example)
        keep = masked.binarize(0.5)
        small, removed = masked.prune()
        return [g.name for g in masked.groups], soft, keep, masked(example), small(example), removed

    plain = run()
    with foreign_default_device():
        watched = run()
    assert plain[0] == ["0"] and _same(plain, watched)


def test_adapter_fits_follow_the_adapter():
    from pnc.adapters import least_squares_init, make_adapter

    src, dst, tokens_dst = torch.randn(6, 4, 6, 6), torch.randn(6, 8, 3, 3).relu(), torch.randn(6, 10, 8)
    device = src.device

    def run():
        adapter = make_adapter((4, 6, 6), "NCHW", (8, 3, 3), "NCHW", relu=True, device=device)
        residual = least_squares_init(adapter, src, dst)
        tokens = make_adapter((4, 6, 6), "NCHW", (10, 8), "NLC", dst_prefix_tokens=1, device=device)
        least_squares_init(tokens, src, tokens_dst)
        same = make_adapter((4, 6, 6), "NCHW", (4, 6, 6), "NCHW", device=device)
        same.identity_init()
        return residual, adapter.state_dict(), same(src)

    plain = run()
    with foreign_default_device():
        watched = run()
    assert _same(plain, watched)


def test_patches_load_onto_the_target_and_hold_cpu_tensors(tmp_path):
    from pnc.surgery.examples import tiny_clone
    from pnc.surgery.patch import HASH_KEY, load_patch, read_patch, save_patch

    net, target, source, images = tiny_clone()
    save_patch(net, tmp_path / "plain.pnc", target_name="t", input_size=(1, 8, 8))
    with foreign_default_device():
        save_patch(net, tmp_path / "watched.pnc", target_name="t", input_size=(1, 8, 8))
        again, _ = load_patch(tmp_path / "plain.pnc", target, {"src": source})
        logits = again(images)
    assert torch.allclose(logits, net(images))
    (meta_a, tensors_a), (meta_b, tensors_b) = (read_patch(tmp_path / n) for n in ("plain.pnc", "watched.pnc"))
    assert meta_a == meta_b and _same(tensors_a, tensors_b)
    assert {t.device.type for t in tensors_a.values()} == {"cpu"}
    headers = [json_header(tmp_path / n)["__metadata__"][HASH_KEY] for n in ("plain.pnc", "watched.pnc")]
    assert headers[0] == headers[1]


def json_header(path: Path) -> dict:
    import json

    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_training_and_tasks_follow_the_model(tmp_path):
    from pnc.surgery.examples import tiny_cnn
    from pnc.zoo.datasets import ImageData, load_dataset
    from pnc.zoo.store import ZooStore
    from pnc.zoo.tasks import CloneTask, select_classes
    from pnc.zoo.train import evaluate, fit, train_zoo_model

    digits = load_dataset("digits")
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = ImageData(x, (x.mean((1, 2, 3)) > 0).long())

    def run(folder: Path, model: nn.Module):
        fit(model.train(), data, epochs=2, lr=0.05, seed=0, batch_size=16, augment=True, progress=False)
        task = CloneTask(digits, [0, 1, 2], [5, 6, 7], [6], seed=1, old_fraction=0.2)
        sets = (task.available_set(), task.eval_sets()["avg"], select_classes(digits.test, [3, 4]))
        store = ZooStore(folder)
        card = train_zoo_model(store, "m", "cnn4", digits, "0-2", 1, 0.05, 0, progress=False, device=x.device)
        return model.state_dict(), evaluate(model, data), [(s.x, s.y) for s in sets], card.state_dict_sha256

    plain = run(tmp_path / "a", tiny_cnn(2, seed=3))
    model = tiny_cnn(2, seed=3)  # made on the CPU, like a model loaded there
    with foreign_default_device():
        watched = run(tmp_path / "b", model)
    assert _same(plain, watched)


def test_fit_moves_each_batch_to_the_model():
    from pnc.zoo.datasets import ImageData
    from pnc.zoo.train import fit

    class Weightless(nn.Module):  # no tensor: it runs on torch's default device, here meta
        def forward(self, x):
            return x.flatten(1)[:, :2]

    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = ImageData(x, torch.zeros(40, dtype=torch.long))  # on the CPU
    weight = nn.Parameter(torch.ones(2))
    seen = []

    def loss_fn(model, xb, yb):
        seen.append((model(xb).device, yb.device))
        return (weight * 0).sum()

    with torch.device(META):
        fit(Weightless(), data, epochs=2, lr=0.1, seed=0, batch_size=16, augment=True, loss_fn=loss_fn, params=[weight])
    assert len(seen) == 4 and set(seen) == {(META, META)}


def test_metrics_and_baselines_follow_the_models(tiny_zoo):
    from pnc.bench.baselines import Budget, run_method
    from pnc.bench.metrics import confusion_matrix, evaluate_clone, locality_similarity, logits_of
    from pnc.zoo.datasets import load_dataset
    from pnc.zoo.store import ZooStore
    from pnc.zoo.tasks import CloneTask

    store = ZooStore(tiny_zoo)
    (target, t_card), (source, s_card) = store.load("t"), store.load("s")
    task = CloneTask(load_dataset("digits"), t_card.classes, s_card.classes, [7], seed=0)
    budget = Budget(loc_epochs=1, joint_epochs=0, binary_epochs=0, scratch_epochs=1)
    sets = task.eval_sets()
    methods = ("Pre-trained", "Direct Ensemble", "Calibrated Ensemble", "Continual+KD", "Joint+Full")

    def run():
        models = [run_method(m, task, target, source, 0, budget).model for m in methods]
        logits = [logits_of(m, sets["avg"].x) for m in models]
        accuracy = [evaluate_clone(m, sets) for m in models]
        similarity = locality_similarity(target, [0], source, [1], sets["tar"].x[:4], num_masks=8)
        return logits, accuracy, similarity, confusion_matrix(logits[1], sets["avg"].y)

    plain = run()
    with foreign_default_device():
        watched = run()
    assert _same(plain, watched)


# --- the command line -------------------------------------------------------------------------------


def test_commands_take_a_device_and_record_it(tiny_zoo, tiny_run, tmp_path, capsys):
    import json

    from pnc.bench.cli import main

    report = json.loads((tiny_run / "report.json").read_text())
    assert report["device"] == "cpu"  # the default
    assert main(["eval", str(tiny_run), "--device", "auto", "--zoo-dir", str(tiny_zoo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["avg_acc"] == report["avg_acc"]
    argv = ["zoo", "train", "--arch", "cnn4", "--dataset", "digits", "--classes", "0-2", "--name", "m", "--epochs", "1"]
    assert main([*argv, "--device", "auto", "--zoo-dir", str(tmp_path)]) == 0
    assert f"-> {tmp_path / 'm'}" in capsys.readouterr().out


def test_the_whole_clone_follows_the_models():
    """clone(): G, the frozen pools, every candidate's stages, halving, tuning and the branch,
    with ``meta`` as torch's default device: every tensor stays with the (CPU) models and the
    clone equals a plain run's."""
    from pnc.surgery import clone
    from pnc.surgery.examples import tiny_pair
    from pnc.surgery.insertion import SearchConfig

    target, source, images, labels = tiny_pair()
    labels = labels.clone()
    labels[:6] = torch.arange(6) % 3  # some images of the target's classes: the arbitrating path
    config = SearchConfig(loc_epochs=1, joint_epochs=1, binary_epochs=1, min_steps_per_epoch=2, tune_epochs=1)

    def run():
        net = clone(target, source, images, labels, [1], config=config, num_masks=8, progress=False)
        with torch.no_grad():
            return net(images), next(iter(net.branches.values())).report.target_cut

    plain = run()
    with foreign_default_device():
        watched = run()
    assert _same(plain, watched)
