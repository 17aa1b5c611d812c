import pytest
import yaml

from passl.config import load_config, save_config
from passl.errors import ConfigError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def child(tmp_path):
    write(tmp_path, "base/runtime.yaml", "seed: 1\ndevice: cpu\nepochs: 10\n")
    write(tmp_path, "base/model.yaml",
          "model:\n  name: SwAV\n  backbone: {name: ResNet, depth: 50, stem: imagenet}\n"
          "  loss: {name: SwAVLoss, nmb_crops: [2, 6], epsilon: 0.05}\n")
    return write(tmp_path, "exp/child.yaml",
                 "_base_: [../base/runtime.yaml, ../base/model.yaml]\n"
                 "epochs: 20\n"
                 "model:\n  backbone: {depth: 18}\n"
                 "  loss: {_replace_: true, name: SwAVLoss, nmb_crops: [2]}\n"
                 "amp: {enable: false}\n")


def test_bases_are_merged_deeply_and_child_wins(child):
    cfg = load_config(child)
    assert cfg.epochs == 20 and cfg.seed == 1 and cfg.device == "cpu"
    assert cfg.model.backbone == {"name": "ResNet", "depth": 18, "stem": "imagenet"}


def test_replace_drops_base_keys(child):
    cfg = load_config(child)
    assert cfg.model.loss == {"name": "SwAVLoss", "nmb_crops": [2]}


def test_overrides_parse_yaml_values(child):
    cfg = load_config(child, ["epochs=5", "model.loss.nmb_crops=[224, 96]",
                              "amp.enable=true", "device=gpu", "model.backbone.stem=cifar"])
    assert cfg.epochs == 5 and isinstance(cfg.epochs, int)
    assert cfg.model.loss.nmb_crops == [224, 96]
    assert cfg.amp.enable is True
    assert cfg.model.backbone.stem == "cifar"


def test_override_list_element_by_index(tmp_path):
    path = write(tmp_path, "c.yaml", "hooks:\n  - {name: A, interval: 1}\n  - {name: B}\n")
    cfg = load_config(path, ["hooks.0.interval=3"])
    assert cfg.hooks[0].interval == 3
    with pytest.raises(ConfigError, match="hooks.5 is not an index of a list of 2 items"):
        load_config(path, ["hooks.5.interval=3"])


def test_unknown_override_key_suggests_and_plus_adds(child):
    with pytest.raises(ConfigError) as e:
        load_config(child, ["model.backbone.deph=34"])
    msg = str(e.value)
    assert "model.backbone.deph" in msg and "did you mean: depth" in msg and "child.yaml" in msg
    assert "+model.backbone.deph" in msg
    cfg = load_config(child, ["+model.backbone.width_multiplier=2", "+model.neck.out_dim=64"])
    assert cfg.model.backbone.width_multiplier == 2 and cfg.model.neck.out_dim == 64


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, "c.yaml", "epocs: 3\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'epocs'.*did you mean: epochs"):
        load_config(path)


def test_blocks_know_their_key_path_and_file(child):
    cfg = load_config(child)
    assert cfg.model.backbone.key_path == "model.backbone"
    assert cfg.model.backbone.source == child


@pytest.mark.parametrize("text, match", [
    ("model: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "must be a YAML mapping"),
    ("_base_: missing.yaml\n", "_base_ file not found: missing.yaml"),
])
def test_bad_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, "c.yaml", text))


def test_missing_file_and_bad_override_syntax(tmp_path, child):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(child, ["epochs"])


def test_save_config_round_trips(child, tmp_path):
    cfg = load_config(child, ["epochs=7"])
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, str(out))
    assert yaml.safe_load(out.read_text()) == cfg.to_dict()
    assert load_config(str(out)).to_dict() == cfg.to_dict()


def test_tilde_override_deletes_keys_and_list_items(child):
    cfg = load_config(child, ["~model.backbone.stem", "~model.loss.nmb_crops.0", "~amp"])
    assert "stem" not in cfg.model.backbone and "amp" not in cfg
    assert cfg.model.loss.nmb_crops == []
    with pytest.raises(ConfigError, match=r"-o ~model.backbone.stemm: no key 'model.backbone.stemm'"
                                          r" to delete .*did you mean: stem"):
        load_config(child, ["~model.backbone.stemm"])


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "c.yaml", "epochs: 1\nmodel: {name: X, a: 1\n  b: 2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3:4: not valid YAML: expected ',' or '}'"):
        load_config(path)


def test_a_mistyped_config_path_names_the_nearest_files(tmp_path):
    configs = tmp_path / "configs" / "swav"
    configs.mkdir(parents=True)
    for name in ("swav_r18_digits.yaml", "swav_r50_100ep.yaml", "notes.txt"):
        (configs / name).write_text("epochs: 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(configs / "swav_r18_digit.yaml"))
    assert "(did you mean: " + str(configs / "swav_r18_digits.yaml") in str(error.value)  # first
    with pytest.raises(ConfigError, match=r"did you mean: \S*configs/swav/swav_r50_100ep\.yaml[,?]"):
        load_config(str(tmp_path / "configs" / "swavv" / "swav_r50_100ep.yaml"))  # folder typo
    with pytest.raises(ConfigError) as error:
        load_config(str(configs / "unrelated.yaml"))
    assert "did you mean" not in str(error.value)
    with pytest.raises(ConfigError, match=r"_base_ file not found: swav_r50_10ep\.yaml .*did you "
                                          r"mean: swav_r50_100ep\.yaml[,?]"):
        load_config(write(configs, "child.yaml", "_base_: swav_r50_10ep.yaml\n"))
