"""The paper's data sets (CityScapes, NYUv2, CelebA, QM9) on tiny fabricated copies of their layouts.

Each data set is written under ``tmp_path`` in the exact layout its DataModule reads (MTAN's ``.npy``
folders, torchvision's CelebA folder, PyTorch Geometric's raw QM9 files processed with RDKit), then:
the DataModule's batches and task specs, the model's forward/backward, a tiny training run through
the runner (a few steps, tiny widths) with finite metrics, and the missing-data error messages.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import make_datamodule, make_model, module_classes
from benchmarks.paper.data import CelebADataModule, CityScapesDataModule, NYUv2DataModule, QM9DataModule
from benchmarks.paper.modules import PaperMTLModule, PaperSingleTaskModule
from benchmarks.paper.tasks import make_paper_metric, normal_task, paper_task_loss, segmentation_task

TINY_SEGNET = {"filters": [4, 4, 8, 8, 8]}


# --------------------------------------------------------------------------- fabricated layouts


def write_dense(root: Path, n_train: int, n_val: int, hw: tuple[int, int], num_classes: int, normal: bool,
                label_dir: str = "label", seed: int = 0) -> Path:
    """MTAN's pre-processed layout: root/{train,val}/{image,<label_dir>,depth[,normal]}/<i>.npy."""
    rng = np.random.default_rng(seed)
    h, w = hw
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ["image", label_dir, "depth"] + (["normal"] if normal else []):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
            label = rng.integers(-1, num_classes, size=(h, w)).astype(np.float32)  # -1 = ignore, stored as float
            np.save(root / split / label_dir / f"{i}.npy", label)
            depth = rng.uniform(0.5, 5.0, size=(h, w, 1)).astype(np.float32)
            depth[rng.random((h, w)) < 0.1] = 0.0  # missing depth
            np.save(root / split / "depth" / f"{i}.npy", depth)
            if normal:
                nv = rng.normal(size=(h, w, 3)).astype(np.float32)
                nv /= np.linalg.norm(nv, axis=-1, keepdims=True)
                nv[rng.random((h, w)) < 0.1] = 0.0  # missing normal
                np.save(root / split / "normal" / f"{i}.npy", nv)
    return root


ATTRS = [f"Attr_{k}" for k in range(40)]


def write_celeba(root: Path, partition: tuple[int, int, int] = (6, 3, 3), size: tuple[int, int] = (22, 18)) -> Path:
    """torchvision's CelebA layout: root/celeba/img_align_celeba/*.jpg + the five annotation files."""
    from PIL import Image

    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names, parts = [], []
    for split, n in enumerate(partition):
        for _ in range(n):
            names.append(f"{len(names) + 1:06d}.jpg")
            parts.append(split)
    for name in names:
        arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(arr).save(base / "img_align_celeba" / name)
    attrs = rng.choice([-1, 1], size=(len(names), 40))
    attrs[:2] = [[1] * 40, [-1] * 40]  # both classes present in the train split
    lines = [str(len(names)), " ".join(ATTRS) + " "]  # the official header line ends with a space
    lines += [f"{n} " + " ".join(f"{v:2d}" for v in row) for n, row in zip(names, attrs, strict=True)]
    (base / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts, strict=True)))
    (base / "identity_CelebA.txt").write_text("".join(f"{n} {k % 3 + 1}\n" for k, n in enumerate(names)))
    bbox = [str(len(names)), "image_id x_1 y_1 width height"] + [f"{n} 95 71 226 313" for n in names]
    (base / "list_bbox_celeba.txt").write_text("\n".join(bbox) + "\n")
    lm_head = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    lms = [str(len(names)), lm_head] + [f"{n} 69 109 106 113 77 142 73 152 108 154" for n in names]
    (base / "list_landmarks_align_celeba.txt").write_text("\n".join(lms) + "\n")
    return root


QM9_SMILES = ["C", "CO", "CCO", "C=O", "CC#N", "CF", "OC=O", "CN"]


def write_qm9_raw(root: Path, smiles: list[str] = QM9_SMILES, uncharacterized: tuple[int, ...] = (8,)) -> Path:
    """PyG's raw QM9 files (processed with RDKit): gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    raw = root / "raw"
    raw.mkdir(parents=True)
    writer = Chem.SDWriter(str(raw / "gdb9.sdf"))
    for k, s in enumerate(smiles):
        mol = Chem.AddHs(Chem.MolFromSmiles(s))
        assert AllChem.EmbedMolecule(mol, randomSeed=k) == 0
        mol.SetProp("_Name", f"gdb_{k + 1}")
        writer.write(mol)
    writer.close()
    cols = ("mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,"
            "u0_atom,u298_atom,h298_atom,g298_atom")
    rng = np.random.default_rng(0)
    rows = [cols] + [f"gdb_{k + 1}," + ",".join(f"{v:.6f}" for v in rng.normal(size=19)) for k in range(len(smiles))]
    (raw / "gdb9.sdf.csv").write_text("\n".join(rows) + "\n")
    head = [f"header line {i}" for i in range(9)]  # PyG skips 9 header lines and 2 trailing ones
    body = [f"  {i}  gdb_{i}  0.0  0.0" for i in uncharacterized]
    (raw / "uncharacterized.txt").write_text("\n".join(head + body + ["footer"]) + "\n")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper_data")
    write_dense(root / "cityscapes", 6, 2, (32, 64), 7, normal=False, label_dir="label_7")
    write_dense(root / "nyuv2", 5, 2, (32, 32), 13, normal=True)
    write_celeba(root)
    write_qm9_raw(root / "qm9")
    return root


def _finite(values) -> bool:
    return all(math.isfinite(float(v.detach() if isinstance(v, torch.Tensor) else v)) for v in values)


def _run(out: Path, dataset: str, data_kw: dict, model_kw: dict, *args: str) -> dict:
    import json

    from benchmarks import run as runner

    argv = ["--dataset", dataset, "--epochs", "1", "--threads", "1", "--progress", "false", "--out", str(out),
            "--data-kw", json.dumps(data_kw), "--model-kw", json.dumps(model_kw), *args]
    return runner.main(argv)


def _run_json(out: Path, name: str) -> dict:
    import json

    return json.loads((out / "runs" / f"{name}.json").read_text())


# --------------------------------------------------------------------------- losses and metrics


def test_dense_losses_ignore_missing_pixels() -> None:
    torch.manual_seed(0)
    spec = segmentation_task(4)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    labels = torch.randint(0, 4, (2, 8, 8))
    labels[0, :4] = -1
    valid = labels >= 0
    ref = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    assert torch.allclose(paper_task_loss(spec, logits, labels.float()), ref)
    # every label missing: a zero that still reaches the parameters (per-task Jacobians need a graph)
    zero = paper_task_loss(spec, logits, torch.full((2, 8, 8), -1.0))
    zero.backward()
    assert float(zero.detach()) == 0.0 and logits.grad is not None
    depth = torch.rand(2, 1, 8, 8) + 0.5
    depth[:, :, :2] = 0  # missing
    pred = depth.clone()
    pred[:, :, :2] = 100.0  # wrong only where depth is missing
    assert float(paper_task_loss(spec.__class__("depth", "regression", None, "abs_err", False), pred, depth)) == 0.0
    nspec = normal_task()
    gt = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8), dim=1)
    gt[:, :, 0] = 0
    assert float(paper_task_loss(nspec, 5 * gt + 0.0, gt)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    with pytest.raises(ValueError, match="channels"):
        paper_task_loss(nspec, torch.randn(2, 2, 8, 8), gt)


def test_dense_metrics_values_and_directions() -> None:
    seg = make_paper_metric(segmentation_task(3))
    labels = torch.tensor([[[0, 1, 2, -1]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1, 1, 0]]]), 3).permute(0, 3, 1, 2).float()
    seg.update(logits, labels.float())
    v = seg.compute()
    # class 0: IoU 1, class 1: 1/2, class 2: 0 (never predicted); the ignored pixel counts nowhere
    assert float(v["pixacc"]) == pytest.approx(2 / 3) and float(v["miou"]) == pytest.approx(0.5)
    depth = make_paper_metric(segmentation_task(3).__class__("depth", "regression", None, "abs_err", False))
    gt = torch.tensor([[[[1.0, 2.0, 0.0, 4.0]]]])
    depth.update(torch.tensor([[[[2.0, 2.0, 9.0, 2.0]]]]), gt)
    d = depth.compute()
    assert float(d["abs_err"]) == pytest.approx(1.0) and float(d["rel_err"]) == pytest.approx((1 + 0 + 0.5) / 3)
    normal = make_paper_metric(normal_task())
    angles = torch.linspace(0.0, 60.0, 121)  # degrees, median 30
    rad = torch.deg2rad(angles)
    pred = torch.stack([torch.sin(rad), torch.zeros_like(rad), torch.cos(rad)]).reshape(1, 3, 1, -1)
    target = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand_as(pred).clone()
    target[..., 0] = 0  # a missing normal (its angle, 0, is not counted)
    normal.update(pred, target)
    n = normal.compute()
    kept = angles[1:]
    assert float(n["mean_angle"]) == pytest.approx(float(kept.mean()), abs=1e-3)
    assert float(n["median_angle"]) == pytest.approx(float(kept.median()), abs=0.3)
    assert float(n["within_11_25"]) == pytest.approx(float((kept < 11.25).float().mean()), abs=1e-6)
    assert float(n["within_30"]) == pytest.approx(float((kept < 30).float().mean()), abs=1e-6)
    # Delta-m% (eq. 14) needs the right directions
    assert seg.higher_is_better == {"miou": True, "pixacc": True}
    assert depth.higher_is_better == {"abs_err": False, "rel_err": False}
    assert normal.higher_is_better == {"mean_angle": False, "median_angle": False, "within_11_25": True,
                                       "within_22_5": True, "within_30": True}
    normal.reset()
    assert all(math.isnan(float(x)) for x in normal.compute().values())


# --------------------------------------------------------------------------- CityScapes / NYUv2


def test_cityscapes_datamodule(data_root: Path) -> None:
    dm = make_datamodule("cityscapes", root=str(data_root / "cityscapes"), batch_size=2, augment=False)
    assert isinstance(dm, CityScapesDataModule)
    assert [s.name for s in dm.task_specs] == ["segmentation", "depth"]  # known before setup
    dm.setup()
    assert dm.in_shape == (3, 32, 64)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (5, 1, 2)  # 10% of train held out
    assert not set(dm.split_ids["val"]) & set(dm.split_ids["train"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 64) and x.dtype == torch.float32
    assert y["segmentation"].shape == (2, 32, 64) and y["segmentation"].dtype == torch.long
    assert int(y["segmentation"].min()) == -1 and int(y["segmentation"].max()) <= 6
    assert y["depth"].shape == (2, 1, 32, 64)
    raw = np.load(data_root / "cityscapes" / "val" / "label_7" / "0.npy")
    _, yt = dm.test_set[0]
    assert np.array_equal(yt["segmentation"].numpy(), raw.astype(np.int64))
    # the reference protocol: no held-out images, validation on the test folder
    dm0 = CityScapesDataModule(root=data_root / "cityscapes", val_fraction=0.0)
    dm0.setup()
    assert dm0.val_set is dm0.test_set and len(dm0.train_set) == 6


def test_augmentation_keeps_shapes_and_scales_depth(data_root: Path) -> None:
    from benchmarks.paper.data import random_scale_crop_flip

    torch.manual_seed(3)
    dm = NYUv2DataModule(root=data_root / "nyuv2", augment=True)
    dm.setup()
    img, tg = dm.train_set[0]
    assert img.shape == (3, 32, 32) and tg["normal"].shape == (3, 32, 32) and tg["segmentation"].dtype == torch.long
    depth = torch.full((1, 8, 8), 2.0)
    for _ in range(10):
        _, out = random_scale_crop_flip(torch.zeros(3, 8, 8), {"depth": depth, "segmentation": torch.zeros(8, 8).long()})
        assert out["depth"].shape == (1, 8, 8)
        assert min(abs(float(out["depth"].max()) - 2.0 / s) for s in (1.0, 1.2, 1.5)) < 1e-5


@pytest.mark.parametrize("attention", [True, False])
def test_segnet_mtan_forward_backward(data_root: Path, attention: bool) -> None:
    dm = NYUv2DataModule(root=data_root / "nyuv2", batch_size=2, augment=False)
    net = make_model(dm, attention=attention, **TINY_SEGNET)
    x, y = next(iter(dm.train_dataloader()))
    out = net(x)
    assert out["segmentation"].shape == (2, 13, 32, 32)
    assert out["depth"].shape == (2, 1, 32, 32)
    assert torch.allclose(out["normal"].norm(dim=1), torch.ones(2, 32, 32), atol=1e-4)
    module = module_classes(dm)[0](net, dm.task_specs, method="ls")
    losses = module.evaluate_task_losses((x, y))
    assert losses.shape == (3,) and _finite(losses)
    losses.sum().backward()
    shared = [p for p in net.trunk.parameters() if p.grad is not None]
    assert shared and all(torch.isfinite(p.grad).all() for p in shared)
    if attention:  # every task's attention branch reaches the loss
        for t in ("segmentation", "depth", "normal"):
            assert net.trunk.enc_att[t][0][0].weight.grad is not None
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.zeros(1, 3, 40, 32))


# --------------------------------------------------------------------------- CelebA


def test_celeba_datamodule(data_root: Path) -> None:
    dm = make_datamodule("celeba", root=str(data_root), check_md5=False, image_size=16, batch_size=4)
    assert isinstance(dm, CelebADataModule)
    dm.setup()
    assert [s.name for s in dm.task_specs] == ATTRS and all(s.metric == "f1" for s in dm.task_specs)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 3, 3)  # list_eval_partition.txt
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.shape == (4, 40) and y.dtype == torch.float32 and set(y.unique().tolist()) <= {0.0, 1.0}
    net = make_model(dm, width=2)
    out = net(x)
    assert len(out) == 40 and out["Attr_0"].shape == (4,)
    # the celeba folder itself is accepted too
    dm2 = CelebADataModule(root=data_root / "celeba", check_md5=False, image_size=16)
    dm2.setup()
    assert len(dm2.train_set) == 6
    # torchvision's MD5 check rejects the fabricated annotation files, with a message saying what to do
    with pytest.raises(RuntimeError, match="check_md5=False"):
        CelebADataModule(root=data_root).setup()


# --------------------------------------------------------------------------- QM9


def test_qm9_datamodule_and_model(data_root: Path, tmp_path: Path) -> None:
    dm = make_datamodule("qm9", root=str(data_root / "qm9"), num_val=1, num_test=1, batch_size=3)
    assert isinstance(dm, QM9DataModule)
    dm.setup()  # PyG processes the raw files with RDKit (molecule 8 is listed as uncharacterized)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (5, 1, 1)
    assert [s.name for s in dm.task_specs] == ["mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv"]
    homo, mu = dm.task_specs[2], dm.task_specs[0]
    raw_y = dm.train_set._data.y[torch.as_tensor(dm.split_idx["train"])].double()  # PyG's units (eV)
    assert homo.target_std == pytest.approx(1000 * float(raw_y[:, 2].std()), rel=1e-5)  # MAE reported in meV
    assert mu.target_std == pytest.approx(float(raw_y[:, 0].std()), rel=1e-5)  # Debye, unchanged
    assert not homo.higher_is_better and homo.metric == "mae"
    g = dm.train_set[0]
    n = int(g.num_nodes)
    assert g.edge_index.shape == (2, n * (n - 1)) and g.edge_attr.shape == (n * (n - 1), 5)
    assert g.y.shape == (1, 11)
    ys = torch.cat([dm.train_set[i].y for i in range(len(dm.train_set))])
    assert torch.allclose(ys.mean(0), torch.zeros(11), atol=1e-5)  # standardised with train statistics
    batch, y = next(iter(dm.train_dataloader()))
    assert y.shape == (3, 11) and int(batch.num_graphs) == 3
    net = make_model(dm, dim=8)
    out = net(batch)
    assert out["mu"].shape == (3,)
    module = module_classes(dm)[0](net, dm.task_specs, method="ls")
    losses = module.evaluate_task_losses((batch, y))
    losses.sum().backward()
    assert _finite(losses) and net.trunk.lin0.weight.grad is not None
    # an already processed copy needs no raw files (and nothing is downloaded)
    import shutil

    shutil.copytree(data_root / "qm9" / "processed", tmp_path / "qm9b" / "processed")
    dm2 = QM9DataModule(root=tmp_path / "qm9b", num_val=1, num_test=1)
    dm2.setup()
    assert len(dm2.train_set) == 5


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    "cls, kw, expected",
    [
        (CityScapesDataModule, {}, ["train/image/<i>.npy", "label_7", "depth/<i>.npy", "[128, 256, 3]", "val/"]),
        (NYUv2DataModule, {}, ["train/image/<i>.npy", "train/label/<i>.npy", "normal/<i>.npy", "[288, 384, 3]"]),
        (CelebADataModule, {}, ["celeba/img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt",
                                "identity_CelebA.txt", "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt"]),
        (QM9DataModule, {}, ["raw/gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt", "processed/data_v3.pt"]),
    ],
)
def test_missing_data_message(tmp_path: Path, cls, kw: dict, expected: list[str]) -> None:
    empty = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as err:
        cls(root=empty, **kw).setup()
    msg = str(err.value)
    for s in expected + [str(empty), "root=", "LIGHTNING_COST_DATA", "Nothing is downloaded"]:
        assert s in msg, (s, msg)


def test_partial_dense_layout_and_env_var(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    bad = write_dense(tmp_path / "nyuv2", 2, 1, (32, 32), 13, normal=False)  # NYUv2 without normals
    with pytest.raises(FileNotFoundError, match="normal"):
        NYUv2DataModule(root=bad).setup()
    (bad / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of the 2"):
        CityScapesDataModule(root=bad, num_classes=13).setup()
    with pytest.raises(ValueError, match="labels must be in"):
        CityScapesDataModule(root=data_root / "nyuv2").setup()  # 13-class labels read as 7 classes
    monkeypatch.setenv("LIGHTNING_COST_DATA", str(data_root))
    dm = CityScapesDataModule()  # <data root>/cityscapes
    dm.setup()
    assert dm.root == data_root / "cityscapes"


# --------------------------------------------------------------------------- tiny runs through the runner


def test_runner_cityscapes_with_baselines(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cs"
    summary = _run(out, "cityscapes", {"root": str(data_root / "cityscapes"), "batch_size": 2}, TINY_SEGNET,
                   "--methods", "ls", "fairgrad", "--cost", "none",
                   "--lr-scheduler", '{"name": "step", "step_size": 1, "gamma": 0.5}')
    metrics = ["segmentation/miou", "segmentation/pixacc", "depth/abs_err", "depth/rel_err"]
    assert summary["metrics"] == metrics
    assert summary["higher_is_better"] == dict(zip(metrics, [True, True, False, False], strict=True))
    assert len(summary["baseline_rows"]) == 2
    for a in summary["agg"]:
        assert _finite([a[k][0] for k in metrics]) and math.isfinite(a["delta_m"][0])
    res = _run_json(out, "fairgrad__cost-none__seed0")
    assert res["config"]["lr_scheduler"]["name"] == "step" and _finite(res["test"].values())
    assert "depth/rel_err" in (out / "runs.csv").read_text().splitlines()[0]


@pytest.mark.parametrize("dataset", ["nyuv2", "qm9", "celeba"])
def test_runner_with_cost(data_root: Path, tmp_path: Path, dataset: str) -> None:
    cases = {
        "nyuv2": ({"root": str(data_root / "nyuv2"), "batch_size": 2}, TINY_SEGNET, "fairgrad", []),
        "qm9": ({"root": str(data_root / "qm9"), "num_val": 1, "num_test": 1, "batch_size": 2}, {"dim": 8},
                "fairgrad", ["--lr-scheduler", '{"name": "plateau", "factor": 0.7, "patience": 5, "min_lr": 1e-5}']),
        "celeba": ({"root": str(data_root), "check_md5": False, "image_size": 16, "batch_size": 3}, {"width": 2},
                   "ls", []),
    }
    data_kw, model_kw, method, extra = cases[dataset]
    out = tmp_path / dataset
    summary = _run(out, dataset, data_kw, model_kw, "--methods", method, "--cost", "paper", "--baselines", "false",
                   "--cost-kw", '{"trigger": "any", "teleporter": {"inner_steps": 1, "num_perturbations": 1}}',
                   *extra)
    (row,) = summary["rows"]
    assert _finite(row[k] for k in summary["metrics"])
    res = _run_json(out, f"{method}__cost-paper__seed0")
    assert res["best_epoch"] == 0 and math.isfinite(res["val"]["score"])
    if dataset != "celeba":  # the teleport ran through LoRA on the SegNet-MTAN / the MPNN
        assert res["teleports"] + res["rejected_teleports"] >= 1
    assert set(res["higher_is_better"]) == set(summary["metrics"])


def test_module_classes() -> None:
    from benchmarks.models.modules import MTLBenchModule, SingleTaskModule

    assert module_classes(NYUv2DataModule(root="x")) == (PaperMTLModule, PaperSingleTaskModule)
    assert module_classes(object()) == (MTLBenchModule, SingleTaskModule)
