import tomllib
from pathlib import Path

import pytest

from toolkit.config import ConfigError, EvalConfig, PackConfig, TrainConfig, build, resolve, to_toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_resolve_defaults_without_file():
    settings = resolve(TrainConfig, None, {}, "train")
    assert settings == TrainConfig()


def test_resolve_flags_override_file(tmp_path):
    path = write(tmp_path, '[train]\nbatch_size = 32\narch = "resnet18"\nlr = 1\n')
    settings = resolve(TrainConfig, path, {"batch_size": 8, "epochs": None}, "train")
    assert settings.batch_size == 8
    assert settings.arch == "resnet18"
    assert settings.lr == 1.0
    assert isinstance(settings.lr, float)
    assert settings.epochs == TrainConfig().epochs


def test_resolve_reads_only_own_table(tmp_path):
    path = write(tmp_path, '[pack]\nsize = 128\n[train]\nbatch_size = 16\n')
    assert resolve(PackConfig, path, {}, "pack").size == 128
    assert resolve(TrainConfig, path, {}, "train").batch_size == 16


def test_resolve_extra_sections_come_first(tmp_path):
    path = write(tmp_path, '[train]\nbatch_size = 16\n[plan]\nbatch_size = 4\n')
    settings = resolve(TrainConfig, path, {}, "plan", extra_sections=("train",))
    assert settings.batch_size == 4


def test_unknown_key_rejected(tmp_path):
    path = write(tmp_path, "[train]\nbatch_sise = 16\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        resolve(TrainConfig, path, {}, "train")


def test_unknown_table_rejected(tmp_path):
    path = write(tmp_path, "[training]\nbatch_size = 16\n")
    with pytest.raises(ConfigError, match="training"):
        resolve(TrainConfig, path, {}, "train")


def test_top_level_key_rejected(tmp_path):
    path = write(tmp_path, "batch_size = 16\n")
    with pytest.raises(ConfigError, match="batch_size"):
        resolve(TrainConfig, path, {}, "train")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("batch_size", '"64"', "integer"),
        ("batch_size", "true", "integer"),
        ("lr", '"fast"', "number"),
        ("arch", '"vgg16"', "resnet50"),
        ("resume", "1", "true or false"),
    ],
)
def test_invalid_value_named(tmp_path, key, value, expected):
    path = write(tmp_path, f"[train]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        resolve(TrainConfig, path, {}, "train")
    assert key in str(error.value)
    assert expected in str(error.value)


def test_invalid_toml_names_file(tmp_path):
    path = write(tmp_path, "[train\n")
    with pytest.raises(ConfigError, match="recipe.toml"):
        resolve(TrainConfig, path, {}, "train")


def test_tuple_and_path_values(tmp_path):
    path = write(tmp_path, '[pack]\nbackground = [0, 0, 0]\nclasses_file = "names.txt"\n')
    settings = resolve(PackConfig, path, {}, "pack")
    assert settings.background == (0, 0, 0)
    assert settings.classes_file == Path("names.txt")


def test_to_toml_round_trip(tmp_path):
    original = TrainConfig(arch="resnet18", pretrained=Path("w.pth"), batch_size=3)
    path = write(tmp_path, to_toml(original, "train"))
    assert resolve(TrainConfig, path, {}, "train") == original


def test_build_rejects_unknown_key():
    with pytest.raises(ConfigError, match="colour"):
        build(PackConfig, {"colour": 1}, "test")


RECIPES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))
SECTIONS = {"pack": PackConfig, "train": TrainConfig, "eval": EvalConfig}


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_tables_load(recipe):
    document = tomllib.loads(recipe.read_text())
    assert document, f"{recipe} has no tables"
    assert set(document) <= set(SECTIONS)
    for section in document:
        settings = resolve(SECTIONS[section], recipe, {}, section)
        for key, value in document[section].items():
            assert getattr(settings, key) == value
