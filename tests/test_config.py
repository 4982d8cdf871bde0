"""Layered configs: defaults <- YAML <- dotted overrides, type checks, helpful errors, save/load round trip."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mae.config import config_help, load_config, save_config, to_dict
from mae.errors import ConfigError


@dataclass
class ModelCfg:
    patch_size: int = 16
    """Patch size in pixels."""
    name: str = "vit_base"
    mask_ratio: float = field(default=0.75, metadata={"help": "Fraction of patches removed."})


@dataclass
class OptimCfg:
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    lr: float | None = None
    layer_decay: float | None = None


@dataclass
class RunCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    epochs: int = 800
    output_dir: Path = Path("runs/default")
    norm_pix_loss: bool = False
    tags: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    """With no file and no overrides, the dataclass defaults come back unchanged."""
    assert load_config(RunCfg) == RunCfg()


def test_layering_order_defaults_then_yaml_then_overrides(tmp_path):
    """YAML values replace defaults; command-line overrides replace YAML values; untouched keys keep defaults."""
    path = write(tmp_path, "epochs: 100\nmodel:\n  patch_size: 8\n  name: vit_small\n")
    cfg = load_config(RunCfg, path, ["epochs=20"])
    assert cfg.epochs == 20  # override beats YAML
    assert cfg.model.patch_size == 8  # YAML beats default
    assert cfg.model.name == "vit_small"
    assert cfg.model.mask_ratio == 0.75  # nested default kept when YAML sets a sibling


def test_dotted_overrides_reach_nested_fields_and_parse_yaml_values():
    """Overrides address nested fields with dots and read values as YAML (lists, null, bools)."""
    cfg = load_config(
        RunCfg,
        overrides=["model.patch_size=4", "optim.betas=[0.9,0.99]", "optim.lr=null", "norm_pix_loss=true"],
    )
    assert cfg.model.patch_size == 4
    assert cfg.optim.betas == (0.9, 0.99) and isinstance(cfg.optim.betas, tuple)
    assert cfg.optim.lr is None
    assert cfg.norm_pix_loss is True


def test_type_coercion():
    """ints are accepted for floats, '1e-4' (a string to YAML 1.1) for a float, text is kept for str and Path."""
    cfg = load_config(RunCfg, overrides=["model.mask_ratio=1", "optim.lr=1e-4", "model.name=2024", "output_dir=/x"])
    assert cfg.model.mask_ratio == 1.0 and isinstance(cfg.model.mask_ratio, float)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.name == "2024"
    assert cfg.output_dir == Path("/x")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.patch_size=abc", "model.patch_size: expected int, got 'abc'"),
        ("model.patch_size=1.5", "model.patch_size: expected int, got 1.5"),
        ("norm_pix_loss=1", "norm_pix_loss: expected bool, got 1"),
        ("optim.name=lamb", "optim.name: expected one of 'adamw', 'sgd', 'lars', got 'lamb'"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("optim.betas=[0.9,x]", "optim.betas[1]: expected float, got 'x'"),
        ("optim.lr=abc", "optim.lr: expected float | None, got 'abc'"),
    ],
)
def test_wrong_type_raises_config_error_naming_key_and_value(override, message):
    """A value of the wrong type fails with the dotted key, the expected type and the given value."""
    with pytest.raises(ConfigError) as info:
        load_config(RunCfg, overrides=[override])
    assert message in str(info.value)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    """Type errors from the YAML layer name the dotted key as well."""
    path = write(tmp_path, "model:\n  patch_size: sixteen\n")
    with pytest.raises(ConfigError, match=r"model\.patch_size: expected int, got 'sixteen'"):
        load_config(RunCfg, path)


def test_unknown_key_suggests_closest_valid_key(tmp_path):
    """Unknown keys (override or YAML) fail and suggest the closest valid dotted key."""
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.patchsize'; did you mean 'model\.patch_size'\?"):
        load_config(RunCfg, overrides=["model.patchsize=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'; did you mean 'epochs'\?"):
        load_config(RunCfg, write(tmp_path, "epoch: 3\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.pach'"):
        load_config(RunCfg, write(tmp_path, "model:\n  pach: 3\n"))


def test_override_into_a_value_and_without_equals_sign():
    """'epochs.x=1' says epochs is a value, not a section; an override without '=' shows the expected form."""
    with pytest.raises(ConfigError, match="not a section"):
        load_config(RunCfg, overrides=["epochs.x=1"])
    with pytest.raises(ConfigError, match="expected the form key=value"):
        load_config(RunCfg, overrides=["epochs"])


def test_dict_field_overrides_add_keys():
    """Dotted keys below a dict field set entries of that dict."""
    cfg = load_config(RunCfg, overrides=["extra.a=1", "extra.b=2"])
    assert cfg.extra == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "does not exist"),
        ("model: [unclosed\n", "is not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_file_names_the_file(tmp_path, text, fragment):
    """Missing files, invalid YAML and non-mapping documents raise ConfigError naming the file."""
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(RunCfg, path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_empty_yaml_file_means_defaults(tmp_path):
    """An empty YAML file changes nothing."""
    assert load_config(RunCfg, write(tmp_path, "")) == RunCfg()


def test_save_load_round_trip(tmp_path):
    """save_config writes YAML that load_config reads back into an equal config (tuples and paths included)."""
    cfg = load_config(RunCfg, overrides=["model.patch_size=4", "optim.lr=1.5e-4", "tags=[a,b]", "extra.k=3"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(RunCfg, path) == cfg
    assert "betas: [0.9, 0.95]" in path.read_text()  # short lists stay on one line
    assert to_dict(cfg)["output_dir"] == "runs/default"


def test_validate_is_called_after_building():
    """load_config calls validate(), so impossible values are rejected at start-up."""
    with pytest.raises(ConfigError, match="epochs must be > 0, got 0"):
        load_config(RunCfg, overrides=["epochs=0"])


@dataclass
class Inner:
    size: int = 1

    def validate(self) -> None:
        if self.size > 10:
            raise ConfigError(f"inner.size must be <= 10, got {self.size}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None


def test_validate_is_called_on_nested_dataclasses():
    """validate() of nested (and optional nested) dataclasses runs too."""
    with pytest.raises(ConfigError, match=r"inner.size must be <= 10"):
        load_config(Outer, overrides=["inner.size=11"])
    with pytest.raises(ConfigError, match=r"inner.size must be <= 10"):
        load_config(Outer, overrides=["maybe.size=11"])
    assert load_config(Outer, overrides=["maybe.size=3"]).maybe == Inner(size=3)


def test_config_help_lists_every_key_with_type_default_and_help():
    """config_help shows each dotted key with its type, default and docstring/metadata help."""
    text = config_help(RunCfg)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("model.patch_size "))
    assert "(int, default 16)" in line and "Patch size in pixels." in line
    assert "Fraction of patches removed." in text
    for key in ("optim.betas", "optim.lr", "epochs", "output_dir", "extra"):
        assert f"  {key} " in text
