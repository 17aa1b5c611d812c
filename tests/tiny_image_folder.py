"""A few small labelled PNGs in ImageFolder layout, and a linear-evaluation config over them."""
import cv2
import numpy as np
import yaml

# One colour per class; images are that colour plus noise, so classes are separable.
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]
TINY_RESNET = {"name": "ResNet", "depth": 18, "layers": [1, 1, 1, 1], "base_width": 8,
               "stem": "small"}
NORMALIZE = {"name": "Normalize", "to_chw": True}


def write_image_folder(root, per_class=(8, 4), size=16, seed=0, noise=60):
    """``root/train`` and ``root/val`` with ``per_class`` images of each class; pixels are
    the class colour plus uniform noise in [-noise, noise)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for label, colour in enumerate(COLOURS):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                jitter = rng.integers(-noise, noise, size=(size, size, 3))
                image = np.clip(np.array(colour)[::-1] + jitter, 0, 255).astype(np.uint8)  # BGR
                cv2.imwrite(str(folder / f"{i}.png"), image)
    return root


def linear_config(data_root, output_dir, epochs=2, hooks=None):
    """A Classification config (frozen tiny ResNet) as a plain dict."""
    def loader(split, transforms, shuffle):
        return {"dataset": {"name": "ImageFolder", "root": str(data_root / split),
                            "transforms": transforms},
                "sampler": {"batch_size": 4, "shuffle": shuffle, "drop_last": shuffle},
                "loader": {"num_workers": 0}}
    return {
        "epochs": epochs, "output_dir": str(output_dir), "seed": 7, "device": "cpu",
        "model": {"name": "Classification", "backbone": dict(TINY_RESNET),
                  "num_classes": len(COLOURS)},
        "dataloader": {
            "train": loader("train", [{"name": "RandomHorizontalFlip"}, NORMALIZE], True),
            "val": loader("val", [NORMALIZE], False)},
        "optimizer": {"name": "Momentum", "momentum": 0.9, "weight_decay": 0.0},
        "lr_scheduler": {"name": "CosineWarmup", "base_lr": 0.5, "final_lr": 0.0},
        "hooks": hooks if hooks is not None else [{"name": "EvalHook"}],
        "log_interval": 1,
    }


def write_config(path, cfg):
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)
