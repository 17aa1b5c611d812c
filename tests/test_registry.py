import pytest

from passl.config import ConfigDict
from passl.errors import ConfigError
from passl.registry import Registry


@pytest.fixture
def reg():
    reg = Registry("widget")

    @reg.register()
    class Gear:
        def __init__(self, teeth, size=1.0):
            self.teeth, self.size = teeth, size

    @reg.register("Sprocket")
    @reg.register()
    class Pulley:
        def __init__(self, radius=2):
            self.radius = radius

    return reg


def test_register_and_build(reg):
    gear = reg.build({"name": "Gear", "teeth": 12})
    assert (gear.teeth, gear.size) == (12, 1.0)
    assert reg.build({"name": "Sprocket", "radius": 5}).radius == 5
    assert reg.names() == ["Gear", "Pulley", "Sprocket"]


def test_config_wins_over_defaults_and_unused_defaults_are_dropped(reg):
    gear = reg.build({"name": "Gear", "teeth": 3, "size": 2.0}, size=9.0, colour="red")
    assert (gear.teeth, gear.size) == (3, 2.0)
    assert reg.build({"name": "Gear"}, teeth=7).teeth == 7


def test_duplicate_registration_names_the_first(reg):
    with pytest.raises(ValueError, match="already registered by .*Gear"):
        @reg.register("Gear")
        class Other:
            pass


def test_unknown_name_suggests_and_names_key_path(reg):
    cfg = ConfigDict({"name": "Gaer", "teeth": 1}, key_path="model.gear", source="x.yaml")
    with pytest.raises(ConfigError) as e:
        reg.build(cfg)
    msg = str(e.value)
    assert "model.gear.name" in msg and "'Gaer'" in msg and "widget" in msg
    assert "did you mean: Gear" in msg and "x.yaml" in msg


def test_unknown_kwarg_lists_accepted_keys(reg):
    cfg = ConfigDict({"name": "Gear", "teeth": 1, "sise": 3}, key_path="model.gear")
    with pytest.raises(ConfigError) as e:
        reg.build(cfg)
    msg = str(e.value)
    assert "model.gear.sise" in msg and "did you mean: size" in msg
    assert "accepted keys: teeth, size" in msg


def test_missing_required_and_missing_name(reg):
    with pytest.raises(ConfigError, match="Gear needs 'teeth'"):
        reg.build({"name": "Gear"})
    with pytest.raises(ConfigError, match="missing 'name' key.*Gear, Pulley, Sprocket"):
        reg.build({"teeth": 1})
    assert reg.build(None) is None


def test_class_without_constructor_ignores_defaults_and_rejects_keys(reg):
    @reg.register()
    class Plain:
        pass

    assert isinstance(reg.build({"name": "Plain"}, epochs=3), Plain)
    with pytest.raises(ConfigError, match="Plain does not accept 'size'"):
        reg.build({"name": "Plain", "size": 1})
