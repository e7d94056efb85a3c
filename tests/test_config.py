"""training.config: the shipped profiles, loading files and mappings, typed ``key=value``
overrides, the errors (naming the key, with "did you mean" for misspelt ones), the cross-field
checks, and the differences between two configs.

The expected values are written by hand from the profiles in training/configs/ and the rules in
training/config.py's docstring, not read back from the code.
"""

from __future__ import annotations

import pytest
import yaml

from training.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    apply_overrides,
    config_diff,
    config_from_dict,
    load_config,
    parse_override,
    profile_names,
    resolve_profile,
)

# -- profiles, overrides and errors -------------------------------------------------------


def test_profiles_hold_the_papers_recipes():
    assert set(profile_names()) >= {"simmim_paper", "simmim_tiny", "mixmae_paper", "mixmae_tiny"}
    s = load_config("simmim_paper")
    assert (s.method, s.model.size, s.model.img_size, s.model.window_size) == (
        "simmim",
        "base",
        256,
        8,
    )
    assert (s.mask.ratio, s.mask.unit, s.loss.kind, s.loss.sar_weight) == (0.6, 16, "l1", True)
    assert (s.data.batch_size, s.optim.base_lr, s.optim.weight_decay) == (256, 1.5e-4, 0.05)
    assert (s.schedule.epochs, s.schedule.warmup_epochs, s.schedule.min_lr) == (800, 40, 0.0)
    assert s.train.amp == "auto" and s.optim.lr_batch_base == 256
    m = load_config("mixmae_paper")
    assert (m.method, m.mask.ratio, m.mask.unit, m.optim.betas) == ("mixmae", 0.5, 32, [0.9, 0.95])
    assert (m.optim.base_lr, m.optim.weight_decay, m.schedule.warmup_epochs) == (1.5e-4, 0.05, 40)
    for name in ("simmim_tiny", "mixmae_tiny"):
        t = load_config(name)
        assert t.model.size == "tiny" and t.data.batch_size <= 8 and t.schedule.epochs <= 5
    # short names completed by the method; --method overrides the profile's
    assert load_config("tiny", method="mixmae").method == "mixmae"
    assert load_config("paper").model.size == "base" and load_config("paper").method == "simmim"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(
        "simmim_tiny",
        [
            "optim.base_lr=1e-3",
            "optim.betas=[0.9, 0.95]",
            "train.max_steps=7",
            "optim.grad_clip=null",
            "seed=3",
            "loss.sar_weight=false",
            "schedule.warmup_epochs=2",
            "train.log_dir=/tmp/x",
        ],
    )
    assert cfg.optim.base_lr == 1e-3 and isinstance(cfg.optim.base_lr, float)  # "1e-3": a YAML str
    assert cfg.optim.betas == [0.9, 0.95] and cfg.train.max_steps == 7 and cfg.seed == 3
    assert cfg.optim.grad_clip is None and cfg.loss.sar_weight is False
    assert cfg.schedule.warmup_epochs == 2.0 and cfg.train.log_dir == "/tmp/x"
    # a YAML file of one's own, over the defaults
    f = tmp_path / "mine.yaml"
    f.write_text("method: mixmae\nmask: {ratio: 0.5, unit: 32}\noptim: {base_lr: 2.0e-4}\n")
    mine = load_config(str(f), ["data.batch_size=4"])
    assert (mine.method, mine.mask.unit, mine.optim.base_lr, mine.data.batch_size) == (
        "mixmae",
        32,
        2e-4,
        4,
    )
    assert mine.model.size == Config().model.size  # untouched keys keep the defaults
    assert (
        config_diff(
            mine,
            load_config(str(f), ["data.batch_size=4", "train.progress=false"]),
            ignore=("train",),
        )
        == {}
    )
    assert config_diff(mine, load_config(str(f))) == {"data.batch_size": (4, 256)}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.bse_lr=1", "unknown configuration key 'optim.bse_lr' (did you mean optim.base_lr"),
        ("optimiser.base_lr=1", "unknown configuration key 'optimiser'"),
        ("optim.base_lr=fast", "optim.base_lr: expected float, got 'fast'"),
        ("train.max_steps=1.5", "train.max_steps: expected int or null, got 1.5"),
        ("data.batch_size=null", "data.batch_size: expected int, got None"),
        ("loss.kind=l3", "loss.kind: expected 'l1' | 'mse' | 'huber', got 'l3'"),
        ("train.compile=yes-please", "train.compile: expected bool"),
        ("optim.betas=0.9", "optim.betas: expected a list of float"),
        ("model=tiny", "'model' is a section"),
        ("optim.base_lr", "expected key=value"),
        ("schedule.warmup_epochs=9", "schedule.warmup_epochs must be in [0, epochs=4]"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("simmim_tiny", [override])
    assert message in str(e.value)


def test_bad_files_and_profiles(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 1.0e-3\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: unknown configuration key 'optim\.learning_rate'"
    ):
        load_config(str(f))
    with pytest.raises(ConfigError, match=r"not a file and not a profile .*simmim_tiny"):
        load_config("simmim_huge")


def test_profile_names_and_their_files(tmp_path):
    names = profile_names()
    assert names == sorted(names)
    assert {"finetune_paper", "finetune_tiny"} <= set(names)
    assert resolve_profile("simmim_tiny") == CONFIG_DIR / "simmim_tiny.yaml"
    assert resolve_profile("simmim_tiny.yaml") == CONFIG_DIR / "simmim_tiny.yaml"
    assert resolve_profile("tiny", method="mixmae") == CONFIG_DIR / "mixmae_tiny.yaml"
    assert resolve_profile("tiny") == CONFIG_DIR / "simmim_tiny.yaml"  # no method: SimMIM's
    assert resolve_profile("finetune_tiny", method="finetune") == CONFIG_DIR / "finetune_tiny.yaml"
    f = tmp_path / "tiny"  # a file wins over a profile of the same name
    f.write_text("seed: 5\n")
    assert resolve_profile(str(f)) == f
    assert load_config(str(f)).seed == 5


def test_load_config_sources():
    assert load_config() == Config()  # the defaults: the SimMIM paper recipe
    assert load_config(None).method == "simmim"
    assert load_config({"seed": 4, "optim": {"base_lr": 1}}).optim.base_lr == 1.0
    base = load_config("simmim_tiny")
    copy = load_config(base, ["seed=9"])
    assert (copy.seed, base.seed) == (9, 0)  # a Config is copied, not changed
    # --method over the profile's method; the profile's other keys stay
    m = load_config("simmim_tiny", method="mixmae")
    assert (m.method, m.mask.ratio, m.mask.unit) == ("mixmae", 0.6, 16)
    # finetune_tiny by hand: its YAML over the defaults
    f = load_config("finetune_tiny", method="finetune")
    assert (f.method, f.seg.task, f.seg.loss, f.optim.layer_decay) == (
        "finetune",
        "lulc",
        "focal_dice",
        0.7,
    )
    assert (f.schedule.epochs, f.schedule.warmup_epochs, f.optim.lr_batch_base) == (3, 0.5, 8)


def test_yaml_round_trip():
    cfg = load_config("mixmae_tiny", ["optim.betas=[0.8, 0.9]", "train.max_steps=3"])
    data = yaml.safe_load(cfg.to_yaml())
    assert data == cfg.to_dict()
    assert data["optim"]["betas"] == [0.8, 0.9] and data["train"]["max_steps"] == 3
    assert config_from_dict(data) == cfg


def test_parse_override_by_hand():
    assert parse_override("optim.base_lr=1e-3") == (["optim", "base_lr"], "1e-3")  # YAML: a str
    assert parse_override("optim.betas=[0.9, 0.95]") == (["optim", "betas"], [0.9, 0.95])
    assert parse_override("train.log_dir=") == (["train", "log_dir"], "")
    assert parse_override(" seed =3") == (["seed"], 3)
    assert parse_override("a=b=c") == (["a"], "b=c")  # split at the first "="
    for text, message in [
        ("seed", "expected key=value"),
        ("=3", "empty key"),
        ("optim..base_lr=1", "empty key"),
        ("seed=[1", "value is not valid YAML"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_override(text)


def test_overrides_apply_to_a_copy():
    cfg = Config()
    out = apply_overrides(cfg, ["optim.base_lr=1", "seed=2"])
    assert (out.optim.base_lr, out.seed) == (1.0, 2)
    assert isinstance(out.optim.base_lr, float)  # an int is taken for a float, as a float
    assert (cfg.optim.base_lr, cfg.seed) == (Config().optim.base_lr, 0)
    with pytest.raises(ConfigError, match=r"unknown configuration key 'optim\.base_lr\.x'"):
        apply_overrides(cfg, ["optim.base_lr.x=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=true", "override 'seed=true': seed: expected int, got True (bool)"),
        ("train.compile=1", "train.compile: expected bool, got 1 (int)"),
        ("method=true", "method: expected 'simmim' | 'mixmae' | 'finetune', got True (bool)"),
        ("optim.betas=[0.9, x]", "optim.betas[1]: expected float, got 'x' (str)"),
        ("train.log_dir=3", "train.log_dir: expected str"),
    ],
)
def test_type_errors_by_hand(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [override])
    assert message in str(e.value)


def test_unknown_keys_suggest_close_ones():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"sed": 1})
    assert str(e.value).startswith("unknown configuration key 'sed' (did you mean seed, seg?); ")
    with pytest.raises(ConfigError) as e:
        config_from_dict({"optim": {"wieght_decay": 0.1}})
    assert "'optim.wieght_decay' (did you mean optim.weight_decay?)" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_from_dict({"optim": {"zzz": 0.1}})
    assert "unknown configuration key 'optim.zzz'; known: optim.base_lr, " in str(e.value)
    with pytest.raises(ConfigError, match=r"a configuration must be a mapping, got list"):
        config_from_dict([1, 2])
    with pytest.raises(ConfigError, match=r"model: expected a mapping of keys, got 'tiny'"):
        config_from_dict({"model": "tiny"})


def test_config_from_dict_keeps_its_base():
    base = Config()
    cfg = config_from_dict({"model": {"size": "tiny"}}, base)
    assert (cfg.model.size, base.model.size) == ("tiny", Config().model.size)
    assert cfg.model.img_size == base.model.img_size  # other keys of the section: the base's


def test_cross_field_checks_list_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"seed": -1, "data": {"batch_size": 0}}).validate()
    assert str(e.value) == (
        "invalid configuration: data.batch_size must be >= 1, got 0; seed must be >= 0, got -1"
    )
    with pytest.raises(ConfigError, match=r"fine-tuning trains on data\.split=train, got 'val'"):
        load_config("finetune_tiny", ["data.split=val"], method="finetune")
    with pytest.raises(ConfigError, match=r"train\.device must be auto, cpu, cuda or cuda:N"):
        load_config(None, ["train.device=gpu"])
    assert load_config(None, ["train.device=cuda:1"]).train.device == "cuda:1"
    f = tmp_path / "broken.yaml"
    f.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(str(f))


def test_config_diff_by_hand():
    a = {"a": {"x": 1, "y": (1, 2)}, "b": 2}
    b = {"a": {"x": 1, "y": [1, 2]}, "c": 3}
    assert config_diff(a, b) == {"b": (2, None), "c": (None, 3)}  # a tuple equals its list
    assert config_diff(a, b, ignore=("b", "c")) == {}
    # a prefix is a whole key or section, not the start of a name
    one, two = Config(), load_config(None, ["data.batch_size=4", "data.num_workers=1"])
    assert config_diff(one, two, ignore=("data.batch",)) == {
        "data.batch_size": (one.data.batch_size, 4),
        "data.num_workers": (one.data.num_workers, 1),
    }
    assert config_diff(one, two, ignore=("data.num_workers",)) == {
        "data.batch_size": (one.data.batch_size, 4)
    }
    assert config_diff(one, two, ignore=("data",)) == {}
