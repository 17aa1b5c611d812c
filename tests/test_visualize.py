"""tools/visualize.py: the gallery shows each prototype's top-scoring images, the usage counts
cover every image once, the feature map has one point per image; all checked against numbers
computed here, image by image, without the tool's loaders."""
import importlib.util
import os
import subprocess
import sys
import tempfile

import cv2
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from scipy.stats import entropy

from passl.cli import run_cli
from passl.config import load_config
from passl.data import DATASETS
from passl.errors import UserError
from passl.evaluation import feature_map, prototypes, visualize
from passl.io.checkpoint import KIND
from passl.models import MODELS
from passl.utils import plot_visualize, plotting
from test_cli import assert_one_line_error
from tiny_image_folder import NORMALIZE, TINY_RESNET, linear_config, write_config, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "visualize.py")
spec = importlib.util.spec_from_file_location("visualize_tool", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_PROTOTYPES = 6


def swav_config(data_root, output_dir):
    """A tiny SwAV model whose image sets are a KNNHook's blocks, as in the demo config."""
    def block(split):
        return {"dataset": {"name": "ImageFolder", "root": str(data_root / split),
                            "transforms": [NORMALIZE]},
                "sampler": {"batch_size": 5}, "loader": {"num_workers": 0}}
    return {
        "epochs": 1, "output_dir": str(output_dir), "seed": 3, "device": "cpu",
        "model": {"name": "SwAV", "backbone": dict(TINY_RESNET),
                  "neck": {"name": "SwAVNeck", "in_dim": 64, "hidden_dim": 16, "out_dim": 8},
                  "head": {"name": "SwAVPrototypes", "in_dim": 8,
                           "num_prototypes": NUM_PROTOTYPES},
                  "loss": {"name": "SwAVLoss", "nmb_crops": [2], "crops_for_assign": [0, 1]}},
        "hooks": [{"name": "KNNHook", "train": block("train"), "val": block("val")}],
    }


def save_model(cfg, path, seed):
    """A checkpoint of ``cfg.model`` at a random init of ``seed`` (prototypes left unnormalised,
    as a training step leaves them slightly)."""
    paddle.seed(seed)
    model = MODELS.build(cfg.model)
    paddle.save({"kind": KIND, "model": model.state_dict()}, str(path))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("vis")
    data = write_image_folder(base / "data")  # 24 train, 12 val images of 3 classes
    config = write_config(base / "swav.yaml", swav_config(data, base / "run"))
    cfg = load_config(config)
    checkpoints = base / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    models = [save_model(cfg, checkpoints / f"epoch_{epoch}.pd", seed=epoch) for epoch in (1, 2)]
    return {"base": base, "data": data, "config": config, "cfg": cfg, "models": models,
            "ckpt": str(checkpoints / "epoch_2.pd")}


def val_images(data):
    """(normalised CHW, raw HWC RGB) of every val image, in the dataset's order."""
    normalised = DATASETS.build({"name": "ImageFolder", "root": str(data / "val"),
                                 "transforms": [NORMALIZE]})
    raw = DATASETS.build({"name": "ImageFolder", "root": str(data / "val")})
    return ([normalised[i][0] for i in range(len(raw))], [raw[i][0] for i in range(len(raw))],
            raw.labels)


def scores_one_by_one(model, images):
    """Cosine scores of each image on each normalised prototype, one image per forward."""
    model.eval()
    prototypes_matrix = F.normalize(model.head.heads[0].weight, axis=0)
    with paddle.no_grad():
        rows = [paddle.matmul(model.neck(model.backbone(paddle.to_tensor(image[None]))),
                              prototypes_matrix)[0].numpy() for image in images]
    return np.stack(rows)


def test_gallery_shows_the_top_scoring_images_of_the_most_used_prototypes(setup, tmp_path,
                                                                          monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot_visualize, "draw_gallery",
                        lambda rows, output, title, size: drawn.update(rows=rows, title=title))
    result = visualize.prototype_gallery(setup["cfg"], setup["ckpt"], str(tmp_path / "g.png"),
                                         top=3, count=4)
    normalised, raw, _ = val_images(setup["data"])
    scores = scores_one_by_one(setup["models"][1], normalised)
    counts = np.bincount(scores.argmax(1), minlength=NUM_PROTOTYPES)
    assert (counts > 0).sum() >= 2  # a fixture where the order of prototypes means something
    np.testing.assert_array_equal(result["counts"], counts)
    # most used first; among equal counts the lower id
    expected_ids = sorted(range(NUM_PROTOTYPES), key=lambda p: (-counts[p], p))[:4]
    assert list(result["prototypes"]) == expected_ids
    for row, p in zip(result["images"], expected_ids):
        best = sorted(range(len(raw)), key=lambda i: -scores[i, p])[:3]
        np.testing.assert_allclose(scores[row, p], scores[best, p], rtol=1e-5)
        assert scores[row, p][0] == pytest.approx(scores[:, p].max(), rel=1e-5)
    # what is drawn: those images, as stored, with the right share
    assert [row["prototype"] for row in drawn["rows"]] == expected_ids
    for row, indices in zip(drawn["rows"], result["images"]):
        assert row["share"] == pytest.approx(counts[row["prototype"]] / 12)
        for image, index in zip(row["images"], indices):
            np.testing.assert_array_equal(image, raw[index])
    assert "top 3 of 12 val images on 4 most used of 6 prototypes" in drawn["title"]


def test_gallery_of_chosen_prototypes_and_its_png(setup, tmp_path):
    output = tmp_path / "gallery.png"
    result = visualize.prototype_gallery(setup["cfg"], setup["ckpt"], str(output), top=2,
                                         ids=[5, 0], thumb=16)
    assert list(result["prototypes"]) == [5, 0] and result["images"].shape == (2, 2)
    assert output.read_bytes()[:8] == PNG_MAGIC
    # a bare model state dict (what tools/convert_weights.py --model swav writes) works the same
    converted = tmp_path / "converted.pdparams"
    paddle.save(setup["models"][1].state_dict(), str(converted))
    again = visualize.prototype_gallery(setup["cfg"], str(converted), str(output), top=2,
                                        ids=[5, 0], thumb=16)
    np.testing.assert_array_equal(again["images"], result["images"])
    with pytest.raises(UserError, match=r"--ids 6: the model has prototypes 0..5"):
        visualize.prototype_gallery(setup["cfg"], setup["ckpt"], str(output), ids=[6])


def test_gallery_mosaic_places_each_thumbnail():
    images = [[np.full((4, 6, 3), 10 * (r * 3 + c), np.uint8) for c in range(3)] for r in range(2)]
    mosaic = plot_visualize.gallery_mosaic(images, size=8)
    cell = 8 + plot_visualize.GAP
    assert mosaic.shape == (2 * cell - plot_visualize.GAP, 3 * cell - plot_visualize.GAP, 3)
    for r in range(2):
        for c in range(3):
            assert (mosaic[r * cell:r * cell + 8, c * cell:c * cell + 8] == 10 * (r * 3 + c)).all()
    assert (mosaic[8:cell] == 255).all()  # the gap between rows


def test_usage_counts_every_image_once_per_checkpoint(setup, tmp_path):
    output = tmp_path / "usage.png"
    history = visualize.assignment_usage(setup["cfg"], str(output),
                                         run=str(setup["base"] / "run"))
    normalised, _, _ = val_images(setup["data"])
    assert [entry["epoch"] for entry in history] == [1, 2]
    for entry, model in zip(history, setup["models"]):
        scores = scores_one_by_one(model, normalised)
        np.testing.assert_array_equal(entry["counts"],
                                      np.bincount(scores.argmax(1), minlength=NUM_PROTOTYPES))
        assert entry["counts"].sum() == 12
        assert entry["entropy"] == pytest.approx(entropy(entry["counts"]))
    assert output.read_bytes()[:8] == PNG_MAGIC

    one = visualize.assignment_usage(setup["cfg"], str(output), load=setup["ckpt"], split="train")
    assert len(one) == 1 and one[0]["epoch"] is None and one[0]["counts"].sum() == 24


def test_entropy_and_order_helpers():
    counts = np.array([0, 5, 5, 2])
    assert prototypes.assignment_entropy(counts) == pytest.approx(entropy(counts))
    assert prototypes.assignment_entropy(np.array([7, 0, 0])) == 0.0
    assert list(prototypes.usage_order(counts)) == [1, 2, 3, 0]
    # rank 0 reads 0, 2, 4 and rank 1 reads 1, 3; gathered in rank order
    assert list(prototypes.shard_order(5, 2)) == [0, 2, 4, 1, 3]
    assert list(feature_map.evenly_spaced(10, 4)) == [0, 3, 6, 9]
    assert list(feature_map.evenly_spaced(3, 4)) == [0, 1, 2]


def test_feature_map_has_one_point_per_image_and_the_knn_titles(setup, tmp_path):
    output = tmp_path / "features.png"
    panels = visualize.feature_maps(setup["cfg"], str(output), load=setup["ckpt"], method="pca",
                                    k=5)
    _, _, labels = val_images(setup["data"])
    assert [panel["title"].split(":")[0] for panel in panels] == ["random init", "SwAV"]
    for panel in panels:
        assert panel["points"].shape == (12, 2)
        np.testing.assert_array_equal(panel["labels"], labels)
        assert f"kNN top-1 {panel['knn_top1']:.1f}%" in panel["title"]
    # the trained panel shows the loaded model's features: PCA of its pooled val features
    normalised, _, _ = val_images(setup["data"])
    model = setup["models"][1]
    with paddle.no_grad():
        features = F.normalize(model.backbone(paddle.to_tensor(np.stack(normalised))), axis=1)
    expected = feature_map.project_2d(features.numpy(), "pca")
    # PCA axes are defined up to sign
    np.testing.assert_allclose(np.abs(panels[1]["points"]), np.abs(expected), atol=1e-4)
    assert output.read_bytes()[:8] == PNG_MAGIC


def test_tsne_gives_one_point_per_row():
    features = np.random.default_rng(0).normal(size=(9, 5))
    assert feature_map.project_2d(features, "tsne").shape == (9, 2)


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(UserError, match=r"plotting needs matplotlib: pip install -e \.\[plot\]"):
        plotting.pyplot()


def run_tool_in_process(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(tool.main, list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["prototypes", "--load", "missing.pd", "--output", "g.png"], "--load missing.pd: file not found"),
    (["prototypes", "--load", "CKPT", "--output", "g.jpg"], "--output g.jpg: the pictures are PNG"),
    (["prototypes", "--load", "CKPT", "--output", "g.png", "--top", "0"], "--top 0: expected a positive"),
    (["usage", "--run", "nowhere", "--output", "u.png"], "--run nowhere: directory not found"),
    (["usage", "--run", "DATA", "--output", "u.png"], "no epoch_N.pd in"),
    (["features", "--output", "f.png"], "one of the arguments --load --pretrained is required"),
    (["draw", "--output", "f.png"], "invalid choice: 'draw'"),
])
def test_user_errors_are_one_line(setup, capsys, args, fragment):
    args = [a.replace("CKPT", setup["ckpt"]).replace("DATA", str(setup["data"])) for a in args]
    code, err = run_tool_in_process(capsys, *args[:1], "-c", setup["config"], *args[1:])
    assert code == 2
    assert_one_line_error(code, err, fragment)


def test_configs_without_image_sets_or_prototypes_are_one_line_errors(setup, tmp_path, capsys):
    cfg = swav_config(setup["data"], tmp_path / "run")
    del cfg["hooks"]
    no_images = write_config(tmp_path / "no_images.yaml", cfg)
    code, err = run_tool_in_process(capsys, "prototypes", "-c", no_images, "--load", setup["ckpt"],
                                    "--output", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "dataloader.train", "pass --data CFG or --data DIR")
    # --data supplies them; a Classification model has no prototypes to show
    linear = write_config(tmp_path / "linear.yaml", linear_config(setup["data"], tmp_path / "o"))
    code, err = run_tool_in_process(capsys, "prototypes", "-c", linear, "--load", setup["ckpt"],
                                    "--data", setup["config"], "--output", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "--load")  # the SwAV checkpoint does not fit the model
    paddle.save(MODELS.build(load_config(linear).model).state_dict(), str(tmp_path / "clas.pd"))
    code, err = run_tool_in_process(capsys, "usage", "-c", linear, "--load", str(tmp_path / "clas.pd"),
                                    "--output", str(tmp_path / "u.png"))
    assert_one_line_error(code, err, "Classification has no prototypes", "model.name: SwAV")


def test_tool_writes_the_gallery(setup, tmp_path):
    output = tmp_path / "out" / "gallery.png"
    proc = subprocess.run([sys.executable, TOOL, "prototypes", "-c", setup["config"], "--load",
                           setup["ckpt"], "--top", "2", "--prototypes", "3", "--output",
                           str(output)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = visualize.prototype_gallery(setup["cfg"], setup["ckpt"], str(tmp_path / "x.png"),
                                           top=2, count=3)["prototypes"]
    assert f"prototypes {', '.join(map(str, expected))}" in proc.stdout
    image = cv2.imread(str(output))
    assert image is not None and image.shape[0] > 50


@pytest.mark.slow
def test_two_processes_draw_what_one_process_draws(tmp_path):
    # 15 val images: ranks read 8 and 7 of them, interleaved (the gather must restore the order)
    data = write_image_folder(tmp_path / "data", per_class=(8, 5))
    config = write_config(tmp_path / "swav.yaml", swav_config(data, tmp_path / "run"))
    ckpt = tmp_path / "model.pd"
    save_model(load_config(config), ckpt, seed=4)
    pictures = {}
    for nproc in (1, 2):
        output = tmp_path / f"gallery_{nproc}.png"
        launch = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
            "--log_dir", str(tmp_path / "log")]
        proc = subprocess.run([*launch, TOOL, "prototypes", "-c", config, "--load", str(ckpt),
                               "--top", "4", "--output", str(output)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        log = (tmp_path / "log" / "workerlog.0").read_text() if nproc == 2 else ""
        assert proc.returncode == 0, proc.stderr[-2000:] + log[-2000:]
        pictures[nproc] = cv2.imread(str(output))
    np.testing.assert_array_equal(pictures[1], pictures[2])


def test_imagenet_configs_show_their_training_images_and_ask_for_labels_for_the_map():
    swav = load_config(os.path.join(ROOT, "configs", "swav", "swav_r50_100ep.yaml"))
    blocks = visualize.image_set_blocks(swav)
    assert list(blocks) == ["train"]  # galleries and usage: the training images, once each
    assert blocks["train"]["dataset"]["root"] == swav.dataloader.train.dataset.root
    assert blocks["train"]["dataset"]["transforms"] == [  # the first multi-crop size, 224
        {"name": "Resize", "size": 224}, {"name": "CenterCrop", "size": 224}, NORMALIZE]
    linear = load_config(os.path.join(ROOT, "configs", "swav", "swav_clas_r50.yaml"))
    blocks = visualize.image_set_blocks(linear)
    val_transforms = linear.dataloader.val.dataset.transforms
    assert blocks["train"]["dataset"]["root"] == linear.dataloader.train.dataset.root
    assert blocks["train"]["dataset"]["transforms"] == val_transforms  # no random crops
    assert blocks["train"]["sampler"]["shuffle"] is False


# ---------------------------------------------------------------- your own images

FOLDER_CONFIG = os.path.join(ROOT, "configs", "swav", "swav_r18_folder.yaml")
CLASS_NAMES = ["cat", "dog", "fox"]
VIEW = 32  # the folder config's multi-crop sizes, made small


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """swav_r18_folder.yaml on a folder of 24 images in class folders named as animals, a
    tiny model in its shape and a checkpoint of it."""
    base = tmp_path_factory.mktemp("own")
    data = write_image_folder(base / "data")
    for label, name in enumerate(CLASS_NAMES):
        (data / "train" / str(label)).rename(data / "train" / name)
    overrides = [f"dataloader.train.dataset.root={data / 'train'}",
                 f"dataloader.train.dataset.transforms.0.size_crops=[{VIEW},16]",
                 "+model.backbone.layers=[1,1,1,1]", "+model.backbone.base_width=8",
                 "+model.backbone.stem=small", "model.neck.in_dim=64", "model.neck.hidden_dim=16",
                 "model.neck.out_dim=8", "model.head.in_dim=8",
                 f"model.head.num_prototypes={NUM_PROTOTYPES}", "device=cpu"]
    config = str(base / "own.yaml")
    cfg = load_config(FOLDER_CONFIG, overrides)
    write_config(base / "own.yaml", cfg.to_dict())
    model = save_model(cfg, base / "model.pd", seed=5)
    return {"base": base, "train": data / "train", "config": config, "cfg": cfg, "model": model,
            "ckpt": str(base / "model.pd")}


def single_views(folder):
    """Every image of ``folder`` resized, centre-cropped to VIEW and normalised, in order."""
    dataset = DATASETS.build({"name": "ImageFolder", "root": str(folder), "transforms": [
        {"name": "Resize", "size": VIEW}, {"name": "CenterCrop", "size": VIEW}, NORMALIZE]})
    return [dataset[i][0] for i in range(len(dataset))], dataset


def test_gallery_and_usage_work_from_the_training_folder_alone(own_images, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot_visualize, "draw_gallery",
                        lambda rows, output, title, size: drawn.update(title=title))
    result = visualize.prototype_gallery(own_images["cfg"], own_images["ckpt"],
                                         str(tmp_path / "g.png"), top=2, count=3)
    images, _ = single_views(own_images["train"])
    expected = np.bincount(scores_one_by_one(own_images["model"], images).argmax(1),
                           minlength=NUM_PROTOTYPES)
    np.testing.assert_array_equal(result["counts"], expected)
    assert "of 24 train images" in drawn["title"]
    history = visualize.assignment_usage(own_images["cfg"], str(tmp_path / "u.png"),
                                         load=own_images["ckpt"])
    np.testing.assert_array_equal(history[0]["counts"], expected)
    with pytest.raises(UserError, match=r"--split val: there is no val image set here"):
        visualize.assignment_usage(own_images["cfg"], str(tmp_path / "u.png"),
                                   load=own_images["ckpt"], split="val")


def test_feature_map_asks_for_labels_in_one_line(own_images, tmp_path, capsys):
    code, err = run_tool_in_process(capsys, "features", "-c", own_images["config"], "--load",
                                    own_images["ckpt"], "--output", str(tmp_path / "f.png"))
    assert_one_line_error(code, err, "features", "pass --data DIR",
                          "one subfolder of images per class")


def test_feature_map_of_a_class_folder_holds_out_queries_and_names_the_classes(
        own_images, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot_visualize, "draw_feature_maps",
                        lambda panels, method, output, names: drawn.update(names=names))
    panels = visualize.feature_maps(own_images["cfg"], str(tmp_path / "f.png"),
                                    load=own_images["ckpt"], method="pca",
                                    data_cfg=str(own_images["train"]), k=3)
    _, dataset = single_views(own_images["train"])
    # a fifth of each class of 8 (2) are the queries, in folder order
    assert np.bincount(panels[1]["labels"]).tolist() == [2, 2, 2]
    assert panels[1]["points"].shape == (6, 2)
    assert drawn["names"] == CLASS_NAMES
    with tempfile.TemporaryDirectory() as scratch:
        blocks = visualize.folder_image_sets(str(own_images["train"]), VIEW, scratch)
        bank = DATASETS.build(blocks["train"]["dataset"]).relative_paths()
        queries = DATASETS.build(blocks["val"]["dataset"]).relative_paths()
    assert not set(bank) & set(queries)
    assert sorted(bank + queries) == sorted(dataset.relative_paths())


def test_the_legend_names_the_classes(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plot_visualize, "save_figure", lambda figure, path: figures.append(figure))
    panel = {"title": "t", "points": np.zeros((3, 2)), "labels": np.array([0, 2, 1])}
    plot_visualize.draw_feature_maps([panel], "pca", str(tmp_path / "f.png"), CLASS_NAMES)
    legend = figures[0].axes[-1].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == CLASS_NAMES


def test_deepclusterv2_gallery_and_usage_of_each_head(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(plot_visualize, "draw_gallery", lambda rows, output, title, size: None)
    monkeypatch.setattr(plot_visualize, "draw_usage", lambda history, total, output: None)
    cfg = swav_config(setup["data"], tmp_path / "dcv2")
    cfg["model"].update(name="DeepClusterV2",
                        head={"name": "SwAVPrototypes", "in_dim": 8, "num_prototypes": [6, 4]},
                        loss={"name": "DeepClusterV2Loss", "nmb_crops": [2]})
    cfg = load_config(write_config(tmp_path / "dcv2.yaml", cfg))
    model = save_model(cfg, tmp_path / "dcv2.pd", seed=5)
    normalised, _, _ = val_images(setup["data"])
    model.eval()
    with paddle.no_grad():
        embeddings = model.neck(model.backbone(paddle.to_tensor(np.stack(normalised))))
    for head, size in enumerate((6, 4)):
        weight = F.normalize(model.head.heads[head].weight, axis=0)
        counts = np.bincount(paddle.matmul(embeddings, weight).numpy().argmax(1), minlength=size)
        result = visualize.prototype_gallery(cfg, str(tmp_path / "dcv2.pd"),
                                             str(tmp_path / "g.png"), top=2, head=head)
        np.testing.assert_array_equal(result["counts"], counts)
        history = visualize.assignment_usage(cfg, str(tmp_path / "u.png"),
                                             load=str(tmp_path / "dcv2.pd"), head=head)
        np.testing.assert_array_equal(history[0]["counts"], counts)
    with pytest.raises(UserError, match="--head 2: the model has prototype heads 0..1"):
        visualize.prototype_gallery(cfg, str(tmp_path / "dcv2.pd"), str(tmp_path / "g.png"),
                                    head=2)
