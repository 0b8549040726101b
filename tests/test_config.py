"""The typed config: flags and YAML keys one-to-one, precedence, validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vggkit.cli import build_parser, main
from vggkit.config import FIELDS, TrainConfig, apply_overrides, check_tta_translate, resolve_config
from vggkit.errors import UsageError


def test_every_config_key_is_a_train_flag():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(FIELDS) <= dests


def test_yaml_then_flags_override_in_that_order(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 7\nbatch-size: 64\nlr: 0.1\nflip: true\n")
    config = resolve_config({"lr": "0.2"}, config_file=cfg)
    assert (config.epochs, config.batch_size, config.lr, config.flip) == (7, 64, 0.2, True)


def test_yaml_round_trips(tmp_path):
    config = TrainConfig(model="vgg16_bn", epochs=3, betas=[0.8, 0.99], head="gap")
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert resolve_config(config_file=path) == config


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochz: 3\n", "unknown key 'epochz' \\(did you mean 'epochs'\\?\\)"),
        ("epochs: three\n", "epochs must be an integer"),
        ("lr: [1, 2]\n", "lr must be a positive number or 'auto'"),
        ("flip: maybe\n", "flip must be true or false"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("epochs: 0\n", "epochs must be a positive integer"),
        ("optimizer: rmsprop\n", "unknown --optimizer value 'rmsprop'"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        resolve_config(config_file=path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="--config: file .*nope.yaml does not exist"):
        resolve_config(config_file=tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--batch-size", "-4"], "--batch-size must be a positive integer"),
        (["--lr", "-0.1"], "--lr must be positive"),
        (["--lr", "nan"], "--lr must be a positive number or 'auto'"),
        (["--model", "vgg16bn"], "did you mean 'vgg16_bn'"),
        (["--head", "clasic"], "did you mean 'classic'"),
        (["--betas", "0.9"], "--betas must be two numbers"),
        (["--channels", "2"], "--channels must be 1 or 3"),
        (["--label-smoothing", "1.5"], "--label-smoothing must be in"),
        (["--triangle", "0.2,1.5,0"], "--triangle must be START,PEAK,END"),
        (["--lookahead-every", "0"], "--lookahead-every must be a positive integer"),
        (["--norm-lr-scale", "0"], "--norm-lr-scale must be positive"),
        (["--lookahead-decay", "2"], "--lookahead-decay must be in"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert message.replace("\\", "") in err or pytest.fail(err)


def test_mistyped_flag_suggests_the_right_one(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bach-size", "3"])
    assert exc.value.code == 2
    assert "did you mean '--batch-size'" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(
    key=st.sampled_from(sorted(FIELDS)),
    value=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.booleans(), st.none(),
                    st.lists(st.integers(), max_size=3)),
)
def test_any_value_for_any_key_is_accepted_or_a_usage_error(key, value):
    try:
        config = apply_overrides(TrainConfig(), {key: value}, source="test.yaml")
    except UsageError as exc:
        assert "test.yaml" in str(exc) or key.replace("_", "-") in str(exc) or key in str(exc)
    else:
        assert isinstance(config, TrainConfig)


@pytest.mark.parametrize("tta,translate,ok", [(True, 7, True), (True, 8, False), (True, 50, False), (False, 50, True)])
def test_tta_translate_must_be_smaller_than_the_image_side(tta, translate, ok):
    """Checked up front (the shifted views reflect-pad by that much), not at the final test."""
    flags = {"image_size": 8, "tta": tta, "tta_translate": translate}
    if ok:
        assert resolve_config(flags=flags).tta_translate == translate
        return
    with pytest.raises(UsageError, match=rf"^--tta-translate {translate}: must be smaller than the image side 8 "):
        resolve_config(flags=flags)
    with pytest.raises(UsageError, match=rf"^test\.yaml: tta_translate {translate}: must be smaller"):
        apply_overrides(TrainConfig(), flags, source="test.yaml")


def test_tta_translate_against_the_dataset_side():
    """Without --image-size the side is the dataset's: the trainer checks once it is known."""
    config = resolve_config(flags={"tta": True, "tta_translate": 32})
    check_tta_translate(config, 33)
    with pytest.raises(UsageError, match="^--tta-translate 32: must be smaller than the image side 32 "):
        check_tta_translate(config, 32)
    check_tta_translate(config.replace(tta=False), 8)


def test_tta_translate_too_big_exits_2_before_training(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", "vgg_compact", "--epochs", "1", "--subset", "20", "--no-report",
                 "--out", str(run), "--image-size", "8", "--tta", "--tta-translate", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tta-translate 8: must be smaller than the image side 8" in err
    assert not run.exists()
