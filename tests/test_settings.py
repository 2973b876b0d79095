"""core.settings: loading, validation, overrides, the original pipeline's file, bad inputs."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

from core.errors import SettingsError
from core.settings import DEFAULT_SETTINGS_PATH, Settings, dump_settings, load_settings


def test_repo_settings_load():
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings == load_settings(DEFAULT_SETTINGS_PATH)
    assert settings.load_dataset_args.channels is None and settings.model_args.input_shape == (256, 256)
    assert settings.bands is None  # the band count comes from the chips


def test_original_settings_validate_unchanged(original_settings, write_settings, caplog):
    path = write_settings(original_settings)
    with caplog.at_level(logging.WARNING, logger="core.settings"):
        settings = load_settings(path)
    assert settings.model_args.bachnorm_momentum == 0.01
    assert settings.model_args.input_shape == (640, 640, 3)
    assert settings.model_args.filters == 64
    assert settings.load_dataset_args.channels == 3
    assert settings.load_dataset_args.rescale == 255.0
    assert settings.load_dataset_args.target_size == (640, 640)
    assert settings.training_args.epochs == 50
    assert settings.training_args.steps_per_epoch == 723
    assert settings.training_args.validation_steps == 241
    assert settings.checkpoint_args.checkpoint_path == "results_4.h5"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "settings: load_dataset_args.target_size, load_dataset_args.rescale, load_dataset_args.class_mode are the "
        "original pipeline's and ignored here (python pipeline.py check says what replaced each)"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.settings"):
        load_settings(path)  # the same process (pipeline.py running the stages): said once
    assert caplog.records == []


def test_no_legacy_warning_without_legacy_keys(settings_file, caplog):
    with caplog.at_level(logging.WARNING, logger="core.settings"):
        load_settings(settings_file)
    assert caplog.records == []


def test_batchnorm_momentum_alias(original_settings, write_settings):
    args = original_settings["model_args"]
    args["batchnorm_momentum"] = args.pop("bachnorm_momentum")
    assert load_settings(write_settings(original_settings)).model_args.bachnorm_momentum == 0.01


def test_both_momentum_spellings_rejected(original_settings, write_settings):
    original_settings["model_args"]["batchnorm_momentum"] = 0.5
    with pytest.raises(SettingsError, match="bachnorm_momentum or batchnorm_momentum, not both"):
        load_settings(write_settings(original_settings))


# --- bad files ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert "not found" in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "data_root": "data",\n  "experiment": x\n}\n', encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "line 3, column 17" in str(info.value)


def test_binary_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_bytes(b"\xff\xfe\x00II*\x00")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "not a UTF-8 text file" in str(info.value)


@pytest.mark.parametrize("top", [[1, 2], "text", 3, None])
def test_top_level_not_an_object(write_settings, top):
    with pytest.raises(SettingsError, match="top level must be a JSON object"):
        load_settings(write_settings(top))


def test_unknown_section_key(original_settings, write_settings):
    original_settings["model_args"]["filtres"] = 32
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    assert "model_args.filtres: unknown key; did you mean filters?" in str(info.value)


def test_unknown_top_level_key(original_settings, write_settings):
    original_settings["data_rot"] = "data"
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    assert "data_rot: unknown key; did you mean data_root?" in str(info.value)


def test_a_folder_given_as_the_settings_file_is_one_line(tmp_path, write_settings, original_settings):
    with pytest.raises(SettingsError) as info:
        load_settings(tmp_path)
    assert str(info.value).endswith(f"settings file {tmp_path} is a folder: pass the settings file itself")
    folder = write_settings(original_settings).parent
    with pytest.raises(SettingsError) as info:
        load_settings(folder)
    assert f"is a folder (it holds a settings.json: --settings {folder / 'settings.json'})" in str(info.value)


def test_a_misspelt_section_in_a_set_override_names_the_section(write_settings, original_settings):
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings), ["chip_arg.size=100"])
    assert str(info.value) == (
        "--set 'chip_arg.size=100': chip_arg: unknown key; did you mean chip_args? (in chip_arg.size)"
    )


def test_unknown_key_without_close_match_lists_valid_keys(original_settings, write_settings):
    original_settings["training_args"]["zzzz"] = 1
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    assert "training_args.zzzz: unknown key; valid keys: " in str(info.value)
    assert "epochs" in str(info.value)


def test_wrong_type_is_not_coerced(original_settings, write_settings):
    original_settings["training_args"]["epochs"] = "50"
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    assert "training_args.epochs: " in str(info.value)
    assert '(got "50")' in str(info.value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("training_args", "epochs", -1),
        ("training_args", "epochs", 0),
        ("load_dataset_args", "batch_size", 0),
        ("model_args", "bachnorm_momentum", 1.0),
    ],
)
def test_out_of_range(original_settings, write_settings, section, key, value):
    original_settings[section][key] = value
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    assert f"{section}.{key}: " in str(info.value)
    assert f"(got {value})" in str(info.value)


def test_input_shape_must_match_channels(original_settings, write_settings):
    original_settings["model_args"]["input_shape"] = [640, 640, 4]
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    message = str(info.value)
    assert "model_args.input_shape[2] is 4 but load_dataset_args.channels is 3: say the band count once" in message


@pytest.mark.parametrize(
    "channels, shape, bands",
    [(None, [64, 64], None), (None, [64, 64, 4], 4), (5, [64, 64], 5), (5, [64, 64, 5], 5)],
)
def test_band_count_said_once_or_never(write_settings, channels, shape, bands):
    """One place is enough (channels or input_shape's third number), none takes the chips' count."""
    settings = load_settings(
        write_settings({"load_dataset_args": {"channels": channels}, "model_args": {"input_shape": shape}})
    )
    assert settings.bands == bands
    assert settings.model_args.input_shape == tuple(shape)


def test_split_fractions_must_sum_to_one(settings_file):
    with pytest.raises(SettingsError) as info:
        load_settings(settings_file, ['split_args.fractions={"train": 0.5, "val": 0.2, "test": 0.0}'])
    assert "split_args.fractions: train + val + test must be 1, got 0.7" in str(info.value)


def test_error_names_every_bad_key(original_settings, write_settings):
    original_settings["training_args"]["epochs"] = 0
    original_settings["load_dataset_args"]["batch_size"] = 0
    with pytest.raises(SettingsError) as info:
        load_settings(write_settings(original_settings))
    assert "training_args.epochs" in str(info.value)
    assert "load_dataset_args.batch_size" in str(info.value)


# --- --set overrides ------------------------------------------------------------------------


def test_override_int(settings_file):
    settings = load_settings(settings_file, ["training_args.epochs=3"])
    assert settings.training_args.epochs == 3
    assert type(settings.training_args.epochs) is int


def test_override_string_path(settings_file):
    assert load_settings(settings_file, ["data_root=/tmp/x"]).data_root == "/tmp/x"


def test_override_string_field_keeps_digits_as_text(settings_file):
    assert load_settings(settings_file, ["experiment=2024"]).experiment == "2024"


def test_override_list(settings_file):
    assert load_settings(settings_file, ["load_dataset_args.target_size=[256,256]"]).load_dataset_args.target_size == (
        256,
        256,
    )


def test_override_null(original_settings, write_settings):
    path = write_settings(original_settings)
    assert load_settings(path, ["training_args.steps_per_epoch=null"]).training_args.steps_per_epoch is None


def test_overrides_apply_in_order(settings_file):
    settings = load_settings(settings_file, ["training_args.epochs=3", "training_args.epochs=5"])
    assert settings.training_args.epochs == 5


def test_override_unknown_key(settings_file):
    with pytest.raises(SettingsError, match="did you mean filters"):
        load_settings(settings_file, ["model_args.filtres=3"])


def test_override_unknown_section(settings_file):
    with pytest.raises(
        SettingsError, match=r"model_arg: unknown key; did you mean model_args\? \(in model_arg\.filters\)"
    ):
        load_settings(settings_file, ["model_arg.filters=3"])


def test_override_unparsable_value(settings_file):
    with pytest.raises(SettingsError) as info:
        load_settings(settings_file, ["training_args.epochs=abc"])
    assert "training_args.epochs" in str(info.value)


@pytest.mark.parametrize("item", ["training_args.epochs", "=3", "training_args..epochs=3"])
def test_override_malformed(settings_file, item):
    with pytest.raises(SettingsError, match="--set"):
        load_settings(settings_file, [item])


# --- dump, defaults, experiment name --------------------------------------------------------


@pytest.mark.parametrize("which", ["repo", "original"])
def test_dump_round_trips(which, settings_file, original_settings, write_settings, tmp_path, caplog):
    source = settings_file if which == "repo" else write_settings(original_settings, "original.json")
    settings = load_settings(source)
    dumped = tmp_path / "dumped.json"
    dumped.write_text(dump_settings(settings), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.settings"):
        again = load_settings(dumped)
    assert again == settings
    assert dump_settings(again) == dump_settings(settings)
    # A dumped snapshot holds null legacy keys; rerunning from it must not warn about them.
    if which == "repo":
        assert caplog.records == []


def test_default_experiment_is_today(settings_file):
    data = json.loads(settings_file.read_text(encoding="utf-8"))
    del data["experiment"]
    settings_file.write_text(json.dumps(data), encoding="utf-8")
    before = dt.date.today().isoformat()
    experiment = load_settings(settings_file).experiment
    after = dt.date.today().isoformat()
    assert experiment in {"exp-" + before, "exp-" + after}


def test_empty_file_is_all_defaults(write_settings):
    settings = load_settings(write_settings({}))
    assert settings.model_args.input_shape == (256, 256)
    assert settings.load_dataset_args.channels is None and settings.bands is None


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "."])
def test_experiment_must_be_plain_name(settings_file, name):
    with pytest.raises(SettingsError, match="experiment"):
        load_settings(settings_file, [f"experiment={name}"])


def test_empty_experiment_rejected(settings_file):
    with pytest.raises(SettingsError, match="experiment"):
        load_settings(settings_file, ["experiment="])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model_args.padding=valid", r"model_args: padding valid shrinks every convolution"),
        ("model_args.strides=[2,2]", r"model_args: strides must be \[1, 1\]"),
        ("model_args.pool_strides=[1,1]", r"model_args: pool_strides must be \[2, 2\]"),
        ("model_args.pool_size=[3,3]", r"model_args: pool_strides must be \[2, 2\] \(and pool_size \[2, 2\]"),
        ("model_args.activation=rleu", r"model_args.activation: 'rleu' is not a Keras activation; did you mean relu\?"),
        ("model_args.kernel_initializer=he_norml", r"'he_norml' is not a Keras initializer; did you mean he_normal\?"),
    ],
)
def test_model_settings_that_would_fail_mid_run_are_refused_when_loading(override, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(overrides=[override])


def test_pooling_of_another_size_works_with_same_padding():
    settings = load_settings(overrides=["model_args.pool_size=[3,3]", "model_args.pool_padding=same"])
    assert settings.model_args.pool_size == (3, 3)


def test_checkpoint_names_keras_3_accepts():
    from core.settings import checkpoint_file

    for given, saved in [("results_4.h5", "results_4.weights.h5"), ("best.weights.h5", "best.weights.h5"),
                         ("ckpt", "ckpt.weights.h5"), ("model.keras", "model.weights.h5")]:  # fmt: skip
        assert checkpoint_file(load_settings(overrides=[f"checkpoint_args.checkpoint_path={given}"])) == saved


# --- the JSON Schema editors read ----------------------------------------------------------------


def test_the_committed_schema_is_current_and_settings_json_names_it():
    from core.settings import SCHEMA_NAME, schema_text

    root = DEFAULT_SETTINGS_PATH.parent
    assert (root / SCHEMA_NAME).read_text(encoding="utf-8") == schema_text(), "run make readme"
    assert json.loads(DEFAULT_SETTINGS_PATH.read_text())["$schema"] == "./settings.schema.json"
    assert "$schema" not in json.loads(dump_settings(load_settings()))


def test_the_schema_accepts_the_settings_files_and_flags_a_typo(original_settings):
    import jsonschema

    from core.settings import settings_schema

    schema = settings_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(json.loads(DEFAULT_SETTINGS_PATH.read_text()))) == []
    assert list(validator.iter_errors(original_settings)) == []
    original_settings["model_args"]["batchnorm_momentum"] = original_settings["model_args"].pop("bachnorm_momentum")
    assert list(validator.iter_errors(original_settings)) == []
    original_settings["chip_args"] = {"szie": 256}
    errors = [e.message for e in validator.iter_errors(original_settings)]
    assert errors == ["Additional properties are not allowed ('szie' was unexpected)"]
    assert (
        validator.iter_errors({"training_args": {"epochs": "50"}}).__next__().message == "'50' is not of type 'integer'"
    )
