"""Tests of the benchmark data sets, task losses/metrics and models (real data from ../shared/data)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import make_datamodule, make_model
from benchmarks.data import (
    DATA_ENV_VAR,
    MoleculeDataModule,
    MultiLabelDataModule,
    MultiMNISTDataModule,
    default_data_root,
    make_multimnist_composites,
    split_indices,
)
from benchmarks.data.tasks import TaskSpec, make_task_metric, task_loss, task_losses, update_task_metric
from benchmarks.models import MultiTaskNet, fingerprint_mlp, lenet_multimnist, mlp_multilabel

DATA = default_data_root()
MNIST = DATA / "mnist.npz"
YEAST = DATA / "multilabel" / "yeast.npz"
TOX21 = DATA / "molecules" / "tox21.csv.gz"
QM8 = DATA / "molecules" / "qm8.csv.gz"

needs_data = pytest.mark.skipif(not MNIST.is_file(), reason=f"real data not found under {DATA}")


@pytest.fixture(scope="module")
def mnist() -> dict[str, np.ndarray]:
    if not MNIST.is_file():
        pytest.skip(f"{MNIST} not found")
    with np.load(MNIST) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def small_mm() -> MultiMNISTDataModule:
    dm = MultiMNISTDataModule(MNIST, num_train=600, num_val=300, num_test=200, normalize=False, seed=3)
    dm.setup()
    return dm


# --------------------------------------------------------------------------- MultiMNIST


def test_composite_builder_places_digits():
    a = np.zeros((2, 28, 28), np.uint8)
    b = np.zeros((2, 28, 28), np.uint8)
    a[:, 0, 0], a[:, 27, 27], b[:, 0, 0], b[:, 27, 27] = 10, 20, 30, 40
    a[:, 10, 10], b[:, 4, 4] = 5, 9  # both land on canvas pixel (10, 10): max wins
    c = make_multimnist_composites(a, b)
    assert c.shape == (2, 36, 36)
    assert c[0, 0, 0] == 10 and c[0, 27, 27] == 20  # left digit at the top-left
    assert c[0, 6, 6] == 30 and c[0, 33, 33] == 40  # right digit shifted by 6 px
    assert c[0, 10, 10] == 9
    assert int(c.astype(int).sum()) == 2 * (10 + 20 + 30 + 40 + 9)


@needs_data
def test_multimnist_shapes_and_labels_match_the_placed_digits(small_mm, mnist):
    dm = small_mm
    assert dm.in_shape == (1, 36, 36) and dm.num_tasks == 2
    assert [s.name for s in dm.task_specs] == ["left", "right"]
    assert all(s.kind == "multiclass" and s.num_classes == 10 and s.higher_is_better for s in dm.task_specs)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (600, 300, 200)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 36, 36) and x.dtype == torch.float32
    assert y.shape == (256, 2) and y.dtype == torch.long
    for split, ds, src in (("train", dm.train_set, "train"), ("test", dm.test_set, "test")):
        li, ri = dm.source_indices[split]
        xs, ys = mnist[f"x_{src}"], mnist[f"y_{src}"]
        imgs, labels = ds.tensors
        for k in (0, 1, 17, len(ds) - 1):
            img = imgs[k, 0].numpy()
            left, right = xs[li[k]] / 255.0, xs[ri[k]] / 255.0
            assert labels[k].tolist() == [int(ys[li[k]]), int(ys[ri[k]])]
            # top-left corner: only the left digit; bottom rows/right cols: only the right digit
            np.testing.assert_allclose(img[:6, :28], left[:6], atol=1e-6)
            np.testing.assert_allclose(img[28:34, 6:34], right[22:28], atol=1e-6)
            expected = np.zeros((36, 36))
            expected[:28, :28] = left
            expected[6:34, 6:34] = np.maximum(expected[6:34, 6:34], right)
            np.testing.assert_allclose(img, expected, atol=1e-6)


@needs_data
def test_multimnist_resize_and_normalize():
    dm = MultiMNISTDataModule(MNIST, num_train=300, num_val=100, num_test=100, image_size=28)
    dm.setup()
    assert dm.in_shape == (1, 28, 28) and dm.train_set.tensors[0].shape == (300, 1, 28, 28)
    xt = dm.train_set.tensors[0]
    assert abs(float(xt.mean())) < 1e-4 and abs(float(xt.std()) - 1) < 1e-3
    assert lenet_multimnist(dm.task_specs, dm.in_shape).trunk[-2].in_features == 320  # the classic LeNet


@needs_data
def test_multimnist_splits_deterministic_disjoint_and_nested(small_mm):
    dm2 = MultiMNISTDataModule(MNIST, num_train=600, num_val=300, num_test=200, normalize=False, seed=3)
    dm2.setup()
    for a, b in zip(
        (small_mm.train_set, small_mm.val_set, small_mm.test_set),
        (dm2.train_set, dm2.val_set, dm2.test_set),
        strict=True,
    ):
        assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors, strict=True))
    tr = np.concatenate(small_mm.source_indices["train"])
    va = np.concatenate(small_mm.source_indices["val"])
    assert not set(tr) & set(va), "train and val composites must not share source images"
    # another seed gives another split, the test set stays fixed
    dm3 = MultiMNISTDataModule(MNIST, num_train=600, num_val=300, num_test=200, normalize=False, seed=4)
    dm3.setup()
    assert not np.array_equal(dm3.source_indices["val"][0], small_mm.source_indices["val"][0])
    assert torch.equal(dm3.test_set.tensors[0], small_mm.test_set.tensors[0])
    # a subset is the start of a larger set
    dm4 = MultiMNISTDataModule(MNIST, num_train=100, num_val=300, num_test=50, normalize=False, seed=3)
    dm4.setup()
    assert torch.equal(dm4.train_set.tensors[0], small_mm.train_set.tensors[0][:100])
    assert torch.equal(dm4.test_set.tensors[1], small_mm.test_set.tensors[1][:50])
    # the train loader shuffles reproducibly
    b1 = next(iter(small_mm.train_dataloader()))[1]
    b2 = next(iter(dm2.train_dataloader()))[1]
    assert torch.equal(b1, b2)
    assert not torch.equal(b1, small_mm.train_set.tensors[1][:256])


@needs_data
def test_path_override_explicit_and_env(tmp_path, monkeypatch, mnist):
    small = {k: mnist[k][:400] for k in ("x_train", "y_train")} | {
        k: mnist[k][:100] for k in ("x_test", "y_test")
    }
    f = tmp_path / "mine.npz"
    np.savez(f, **small)
    dm = MultiMNISTDataModule(f, num_val=100)
    dm.setup()
    assert dm.file == f and (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 100, 100)
    # $LIGHTNING_COST_DATA moves the data root
    root = tmp_path / "root"
    (root / "multilabel").mkdir(parents=True)
    shutil.copy(f, root / "mnist.npz")
    shutil.copy(YEAST, root / "multilabel" / "yeast.npz")
    monkeypatch.setenv(DATA_ENV_VAR, str(root))
    dm = MultiMNISTDataModule(num_val=50)
    dm.setup()
    assert dm.file == root / "mnist.npz" and len(dm.train_set) == 350
    ml = MultiLabelDataModule()
    ml.setup()
    assert ml.file == root / "multilabel" / "yeast.npz"
    # bare names are looked up under the data root
    ml = MultiLabelDataModule("yeast")
    ml.setup()
    assert ml.file == root / "multilabel" / "yeast.npz"


def test_missing_file_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "nowhere"))
    for dm in (MultiMNISTDataModule(), MultiLabelDataModule(), MoleculeDataModule(cache_dir=tmp_path)):
        with pytest.raises(FileNotFoundError) as e:
            dm.setup()
        msg = str(e.value)
        assert "nowhere" in msg and DATA_ENV_VAR in msg and "Expected layout" in msg
    with pytest.raises(FileNotFoundError, match="multilabel/<name>.npz"):
        MultiLabelDataModule(tmp_path / "absent.npz").setup()


# --------------------------------------------------------------------------- multi-label


@needs_data
def test_multilabel_standardises_with_train_statistics_only():
    dm = MultiLabelDataModule(YEAST, seed=1)
    dm.setup()
    with np.load(YEAST) as z:
        X, Y, labels = z["X"].astype(np.float64), z["Y"], list(z["labels"])
    tr, va, te = (dm.split_idx[k] for k in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (1451, 483, 483)
    assert len(np.unique(np.concatenate([tr, va, te]))) == len(X) == 2417
    np.testing.assert_allclose(dm.x_mean, X[tr].mean(0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(dm.x_mean, X.mean(0), rtol=0, atol=1e-7)  # not the all-data mean
    xtr = dm.train_set.tensors[0].double()
    np.testing.assert_allclose(xtr.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(xtr.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    xva = dm.val_set.tensors[0].double().numpy()
    np.testing.assert_allclose(xva * dm.x_std + dm.x_mean, X[va], atol=1e-5)
    assert torch.equal(dm.test_set.tensors[1], torch.from_numpy(Y[te].astype(np.float32)))
    assert dm.num_tasks == 14 and [s.name for s in dm.task_specs] == labels
    assert all(s.kind == "binary" and s.metric == "auroc" for s in dm.task_specs)
    assert dm.in_shape == (103,)
    # deterministic for a seed
    dm2 = MultiLabelDataModule(YEAST, seed=1)
    dm2.setup()
    assert all(np.array_equal(dm.split_idx[k], dm2.split_idx[k]) for k in dm.split_idx)


def test_split_indices_cover_and_disjoint():
    tr, va, te = split_indices(101, (0.6, 0.2, 0.2), seed=5)
    assert (len(tr), len(va), len(te)) == (61, 20, 20)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(101))


# --------------------------------------------------------------------------- molecules

CSV = """ID,Smiles,tox_a,tox_b,note
m1,CCO,1,0,x
m2,c1ccccc1,0,,y
m3,not_a_smiles,1,1,z
m4,CC(=O)O,,1,w
m5,C1CC1N,0,0,v
m6,CCN(CC)CC,1,,u
m7,C1=CC=CN=C1,,,t
m8,O=C(O)c1ccccc1,0,1,s
m9,CCCCCC,1,0,r
m10,C1CC[,0,0,q
"""


def _write_csv(tmp_path: Path, text: str, name: str = "mols.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_molecules_featurise_drop_invalid_and_mask(tmp_path):
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install rdkit)")
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    f = _write_csv(tmp_path, CSV)
    dm = MoleculeDataModule(f, cache_dir=tmp_path / "cache", fractions=(0.5, 0.25, 0.25), n_bits=1024)
    dm.setup()
    assert dm.num_invalid == 2 and set(dm.invalid_smiles) == {"not_a_smiles", "C1CC["}
    assert dm.num_unlabelled == 1  # m7 has no label at all
    assert dm.target_names == ["tox_a", "tox_b"]  # ID and note are not numeric
    assert dm.resolved_task_type == "binary" and [s.kind for s in dm.task_specs] == ["binary"] * 2
    assert dm.in_shape == (1024,)
    n = len(dm.train_set) + len(dm.val_set) + len(dm.test_set)
    assert n == 7
    Y = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1], dm.test_set.tensors[1]])
    assert int(torch.isnan(Y).sum()) == 3  # m2, m4, m6 each miss one label
    X = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0], dm.test_set.tensors[0]])
    order = np.concatenate([dm.split_idx[k] for k in ("train", "val", "test")])
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    for row, k in zip(X, order, strict=True):
        ref = gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(dm.smiles[k]))
        assert np.array_equal(row.numpy(), ref.astype(np.float32))
    # the cache is reused
    assert not dm.cache_hit and dm.cache_file.is_file()
    dm2 = MoleculeDataModule(f, cache_dir=tmp_path / "cache", fractions=(0.5, 0.25, 0.25), n_bits=1024)
    dm2.setup()
    assert dm2.cache_hit and torch.equal(dm2.train_set.tensors[0], dm.train_set.tensors[0])
    # explicit targets, scaffold split
    dm3 = MoleculeDataModule(f, targets=["tox_b"], cache_dir=tmp_path / "cache", split="scaffold", seed=1)
    dm3.setup()
    assert dm3.num_tasks == 1
    total = sum(len(v) for v in dm3.split_idx.values())
    assert total == len(dm3.smiles) and len(set(np.concatenate(list(dm3.split_idx.values())))) == total


def test_molecules_regression_standardised_with_train_stats(tmp_path):
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install rdkit)")
    rng = np.random.default_rng(0)
    smi = ["C" * k for k in range(1, 21)] + ["c1ccccc1" + "C" * k for k in range(10)]
    lines = ["smiles,y1,y2"] + [
        f"{s},{rng.normal(5, 2):.4f},{'' if i % 7 == 0 else rng.normal(-1, 0.1)}" for i, s in enumerate(smi)
    ]
    f = _write_csv(tmp_path, "\n".join(lines) + "\n")
    dm = MoleculeDataModule(f, cache_dir=tmp_path, batch_size=8)
    dm.setup()
    assert dm.resolved_task_type == "regression"
    assert all(s.kind == "regression" and s.metric == "mae" and not s.higher_is_better for s in dm.task_specs)
    yt = dm.train_set.tensors[1].double().numpy()
    np.testing.assert_allclose(np.nanmean(yt, 0), 0, atol=1e-6)
    np.testing.assert_allclose(np.nanstd(yt, 0), 1, atol=1e-5)
    assert dm.task_specs[0].target_std == pytest.approx(dm.target_std[0])
    assert (
        np.isnan(yt[:, 1]).any()
        or np.isnan(dm.val_set.tensors[1].numpy()[:, 1]).any()
        or np.isnan(dm.test_set.tensors[1].numpy()[:, 1]).any()
    )


@pytest.mark.skipif(not TOX21.is_file(), reason=f"{TOX21} not found")
def test_real_tox21_and_qm8(tmp_path):
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install rdkit)")
    tox = make_datamodule("tox21", cache_dir=tmp_path)
    tox.setup()
    assert tox.num_tasks == 12 and tox.resolved_task_type == "binary"
    assert tox.num_invalid == 8  # hypervalent aluminium salts RDKit refuses
    assert torch.isnan(tox.train_set.tensors[1]).any()
    assert len(tox.train_set) + len(tox.val_set) + len(tox.test_set) == 7831 - 8
    qm8 = make_datamodule("qm8", cache_dir=tmp_path)
    qm8.setup()
    assert qm8.num_tasks == 12 and qm8.resolved_task_type == "regression"
    assert not torch.isnan(qm8.train_set.tensors[1]).any()
    model = make_model(qm8)
    out = model(qm8.val_set.tensors[0][:4])
    assert set(out) == set(qm8.task_names) and all(v.shape == (4,) for v in out.values())


# --------------------------------------------------------------------------- losses and metrics


def test_task_loss_masks_nan_labels_hand_worked():
    spec = TaskSpec.binary("t")
    logits = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    target = torch.tensor([1.0, float("nan"), 0.0])
    loss = task_loss(spec, logits, target)
    expected = (math.log(2.0) + math.log(1 + math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[1] == 0 and torch.isfinite(logits.grad).all()
    # [B, 1] shapes work too
    assert task_loss(spec, logits.detach()[:, None], target[:, None]).item() == pytest.approx(expected)

    reg = TaskSpec.regression("r")
    assert task_loss(reg, torch.tensor([1.0, 5.0, 0.0]), torch.tensor([3.0, float("nan"), 1.0])).item() == (
        pytest.approx((4 + 1) / 2)
    )
    assert task_loss(
        reg, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0]), regression_loss="l1"
    ).item() == (pytest.approx(1.5))

    mc = TaskSpec.multiclass("m", 3)
    lg = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    assert task_loss(mc, lg, torch.tensor([2, -1])).item() == pytest.approx(math.log(3))


def test_task_loss_all_missing_keeps_grad_path():
    lin = nn.Linear(4, 1)
    x = torch.randn(5, 4)
    loss = task_loss(TaskSpec.binary("t"), lin(x), torch.full((5,), float("nan")))
    assert loss.item() == 0 and loss.requires_grad
    (g,) = torch.autograd.grad(loss, [lin.weight])
    assert torch.equal(g, torch.zeros_like(g))
    specs = [TaskSpec.binary("a"), TaskSpec.regression("b")]
    out = {"a": torch.zeros(3, requires_grad=True), "b": torch.ones(3, requires_grad=True)}
    tgt = torch.tensor([[1.0, float("nan")], [0.0, float("nan")], [float("nan"), float("nan")]])
    losses = task_losses(specs, out, tgt)
    assert losses.shape == (2,) and losses[1].item() == 0 and losses[0].item() == pytest.approx(math.log(2))
    assert losses.requires_grad


def test_task_metrics_mask_and_scale():
    auroc = make_task_metric(TaskSpec.binary("t"))
    update_task_metric(
        auroc,
        TaskSpec.binary("t"),
        torch.tensor([0.1, 0.4, 9.0, 0.35]),
        torch.tensor([0.0, 0.0, float("nan"), 1.0]),
    )
    assert auroc.compute().item() == pytest.approx(0.5)  # 1 positive (0.35) vs 0.1 (above) and 0.4 (below)
    one_class = make_task_metric(TaskSpec.binary("t"))
    one_class.update(torch.randn(4), torch.tensor([0.0, 0.0, float("nan"), 0.0]))
    assert math.isnan(one_class.compute().item())

    spec = TaskSpec.regression("r", target_mean=10.0, target_std=2.0)
    mae = make_task_metric(spec)
    update_task_metric(mae, spec, torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.5, float("nan"), 1.0]))
    assert mae.compute().item() == pytest.approx((0.5 + 2.0) / 2 * 2.0)  # original units

    acc = make_task_metric(TaskSpec.multiclass("m", 3))
    acc.update(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]), torch.tensor([0, 2, -1]))
    assert acc.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        TaskSpec("bad.name", "binary", None, "auroc", True)


# --------------------------------------------------------------------------- models


def test_models_forward_shapes_and_structure():
    mm = [TaskSpec.multiclass("left", 10), TaskSpec.multiclass("right", 10)]
    for size in (28, 36):
        net = lenet_multimnist(mm, (1, size, size))
        out = net(torch.randn(3, 1, size, size))
        assert list(out) == ["left", "right"] and all(v.shape == (3, 10) for v in out.values())
    specs = [TaskSpec.binary(f"b{k}") for k in range(14)]
    net = mlp_multilabel(103, specs)
    assert isinstance(net, MultiTaskNet) and any(isinstance(m, nn.BatchNorm1d) for m in net.trunk.modules())
    out = net(torch.randn(5, 103))
    assert len(out) == 14 and all(v.shape == (5,) for v in out.values())
    mixed = [TaskSpec.regression("r"), TaskSpec.binary("b"), TaskSpec.multiclass("c", 4)]
    net = fingerprint_mlp(2048, mixed)
    out = net(torch.randn(6, 2048))
    assert out["r"].shape == (6,) and out["b"].shape == (6,) and out["c"].shape == (6, 4)
    assert not any(
        isinstance(m, nn.BatchNorm1d) for m in fingerprint_mlp(8, mixed, batchnorm=False).modules()
    )
    shared = {id(p) for p in net.shared_parameters()}
    heads = {id(p) for p in net.task_specific_parameters()}
    assert shared and heads and not shared & heads and len(shared | heads) == len(list(net.parameters()))


@pytest.fixture
def one_thread():
    # The test machines have 2 cores shared with other jobs; two intra-op threads under
    # contention make small convolutions ~10x slower, one thread keeps this test at a few seconds.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@needs_data
def test_lenet_learns_multimnist_beyond_chance(one_thread):
    torch.manual_seed(0)
    dm = MultiMNISTDataModule(MNIST, num_train=2000, num_val=500, num_test=10, batch_size=32, image_size=28)
    dm.setup()
    model = make_model(dm)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    step = 0
    while step < 100:
        for x, y in dm.train_dataloader():
            loss = task_losses(dm.task_specs, model(x), y).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 100:
                break
    model.eval()
    metrics = {s.name: make_task_metric(s) for s in dm.task_specs}
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            out = model(x)
            for k, s in enumerate(dm.task_specs):
                update_task_metric(metrics[s.name], s, out[s.name], y[:, k])
    acc = {k: m.compute().item() for k, m in metrics.items()}
    assert all(a > 0.2 for a in acc.values()), acc


# --------------------------------------------------------------------------- the verdict's data sets

FASHION = DATA / "fashion_mnist.npz"
BIRDS = DATA / "multilabel" / "birds.npz"
TOXCAST = DATA / "molecules" / "toxcast.csv.gz"


def _one_step_fit(dm) -> None:
    """One optimizer step of LS through the benchmark module: shapes, masks and losses fit together."""
    from benchmarks.common import quiet, quiet_trainer
    from benchmarks.models.modules import MTLBenchModule

    torch.manual_seed(0)
    module = MTLBenchModule(make_model(dm), dm.task_specs, method="ls")
    before = [p.detach().clone() for p in module.parameters()]
    with quiet():
        quiet_trainer(max_steps=1).fit(module, dm.train_dataloader())
    assert module.mtl_skipped_steps == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.skipif(not (MNIST.is_file() and FASHION.is_file()), reason="mnist.npz / fashion_mnist.npz not found")
def test_multifashion_mnist_takes_each_item_from_its_own_file(mnist):
    dm = make_datamodule("multifashion_mnist", num_train=300, num_val=200, num_test=100, normalize=False)
    assert dm.task_names == ["digit", "fashion"]  # known before reading the files
    dm.setup()
    assert dm.data_files() == [MNIST, FASHION]
    with np.load(FASHION) as z:
        fashion = {k: z[k] for k in z.files}
    for split, ds, src in (("train", dm.train_set, "train"), ("test", dm.test_set, "test")):
        li, ri = dm.source_indices[split]
        imgs, labels = ds.tensors
        for k in (0, 7, len(ds) - 1):
            assert labels[k].tolist() == [int(mnist[f"y_{src}"][li[k]]), int(fashion[f"y_{src}"][ri[k]])]
            img = imgs[k, 0].numpy()
            np.testing.assert_allclose(img[:6, :28], mnist[f"x_{src}"][li[k]][:6] / 255.0, atol=1e-6)  # left: a digit
            np.testing.assert_allclose(img[28:34, 6:34], fashion[f"x_{src}"][ri[k]][22:28] / 255.0, atol=1e-6)
    for i in (0, 1):  # train and validation items of each file are disjoint
        assert not set(dm.source_indices["train"][i]) & set(dm.source_indices["val"][i])
    # one file keeps the single-file construction (MultiFashion)
    one = make_datamodule("multifashion", num_train=50, num_val=20, num_test=10)
    assert one.task_names == ["left", "right"] and one.data_files() == [FASHION]
    _one_step_fit(dm)


def test_composites_use_every_training_image_by_default(tmp_path):
    """Full training sets: num_train=None keeps every official training image (minus num_val for
    validation); a fabricated 2-file layout with 40 / 30 training images checks the counts."""
    rng = np.random.default_rng(0)
    files = []
    for name, n in (("a", 40), ("b", 30)):
        f = tmp_path / f"{name}.npz"
        np.savez(f, x_train=rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, n),
                 x_test=rng.integers(0, 255, (12, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 12))
        files.append(f)
    dm = MultiMNISTDataModule(path_left=files[0], path_right=files[1], num_val=10, batch_size=8)
    dm.setup()
    assert dm.task_names == ["a", "b"]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 12)
    assert sorted(np.concatenate([dm.source_indices["train"][0], dm.source_indices["val"][0]])) == list(range(40))
    right = np.concatenate([dm.source_indices["train"][1], dm.source_indices["val"][1]])
    assert right.max() < 30  # right items come from the second file's 30 images


@pytest.mark.skipif(not BIRDS.is_file(), reason=f"{BIRDS} not found")
def test_birds_reports_tasks_whose_auroc_is_undefined():
    dm = make_datamodule("birds")
    dm.setup()
    assert dm.num_tasks == 19 and all(s.metric == "auroc" for s in dm.task_specs)
    # independently: the labels with a single class in a split of the same seeded 60/20/20 split
    with np.load(BIRDS) as z:
        y, names = z["Y"].astype(float), [str(s) for s in z["labels"]]
    expected = {}
    for split, idx in zip(("train", "val", "test"), split_indices(len(y), (0.6, 0.2, 0.2), 0), strict=True):
        one_class = [n for n, col in zip(names, y[idx].T, strict=True) if len(np.unique(col)) < 2]
        if one_class:
            expected[split] = one_class
    assert dm.undefined_auroc_tasks() == expected and expected["test"]  # e.g. no positive of it in the test split
    task = expected["test"][0]
    spec = next(s for s in dm.task_specs if s.name == task)
    metric = make_task_metric(spec)
    col = dm.task_names.index(task)
    metric.update(torch.randn(len(dm.test_set)), dm.test_set.tensors[1][:, col])
    assert math.isnan(float(metric.compute()))  # undefined: NaN, not 0 or 0.5
    _one_step_fit(dm)


@pytest.mark.skipif(not TOXCAST.is_file(), reason=f"{TOXCAST} not found")
def test_toxcast40_keeps_the_40_most_labelled_assays():
    pytest.importorskip("rdkit", reason="RDKit is not installed (pip install rdkit)")
    import pandas as pd

    dm = make_datamodule("toxcast40")
    dm.setup()
    table = pd.read_csv(TOXCAST)
    labels = table.drop(columns=["smiles"])
    counts = labels.notna().sum()
    chosen = labels[dm.target_names]
    assert dm.num_tasks == 40 and len(set(dm.target_names)) == 40
    # every chosen assay has at least as many labels as any assay left out
    assert counts[dm.target_names].min() >= counts.drop(index=dm.target_names).max()
    # among assays with as many labels, the chosen ones have the larger rarer class
    tied = counts[counts == counts[dm.target_names].min()].index
    rarer = labels[tied].apply(lambda c: min((c == 1).sum(), (c == 0).sum()))
    assert rarer[dm.target_names].min() >= rarer.drop(index=dm.target_names).max()
    assert list(chosen.columns) == [c for c in labels.columns if c in set(dm.target_names)]  # file order
    assert dm.resolved_task_type == "binary" and all(s.kind == "binary" for s in dm.task_specs)
    # kept: the molecules with a label among the 40 assays whose SMILES RDKit parses, in file order
    invalid = set(dm.invalid_smiles)
    kept = [i for i in range(len(table)) if chosen.iloc[i].notna().any() and table["smiles"][i] not in invalid]
    assert list(dm.row_index) == kept
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == len(kept)
    y = torch.cat([dm.train_set.tensors[1], dm.val_set.tensors[1], dm.test_set.tensors[1]])
    assert int(torch.isnan(y).sum()) == int(chosen.iloc[kept].isna().sum().sum())  # missing labels stay NaN (masked)
    _one_step_fit(dm)


def test_file_digest_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    from benchmarks.data import file_sha256

    monkeypatch.setenv("LIGHTNING_COST_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "d.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert (tmp_path / "cache" / "sha256.json").is_file()
    st = f.stat()
    f.write_bytes(b"abd" * 1000)  # same size; with the old mtime the cached digest is trusted
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: read again
    assert file_sha256(f) == hashlib.sha256(b"abd" * 1000).hexdigest()


def test_formats_read_any_file_and_unknown_names_say_what_exists(tmp_path):
    from benchmarks import UnknownDatasetError, dataset_title

    f = tmp_path / "my_labels.npz"
    np.savez(f, X=np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32),
             Y=(np.arange(60).reshape(30, 2) % 3 == 0).astype(np.float32))
    dm = make_datamodule("multilabel", path=str(f))
    dm.setup()
    assert dm.num_tasks == 2 and dm.file == f
    assert dataset_title("multilabel", {"path": str(f)}) == "my_labels"
    assert dataset_title("mnist_composite", {"path_left": "/a/mnist.npz", "path_right": "/b/fashion.npz"}) == \
        "mnist+fashion"
    with pytest.raises(ValueError, match="data_kw path"):
        make_datamodule("molecules")
    with pytest.raises(UnknownDatasetError) as e:
        make_datamodule("imagenet")
    assert "\n" not in str(e.value) and "mnist_composite" in str(e.value) and "toxcast40" in str(e.value)
