import json
import math
from pathlib import Path

import pytest

from dpcam import records
from dpcam.errors import UserError

TRAIN = {
    "dataset": "d",
    "ldp": None,
    "ldp_guarantee": None,
    "model": "smallcnn",
    "scheme": "none",
    "target_epsilon": None,
    "epsilon": None,
    "delta": None,
    "noise_multiplier": None,
    "max_grad_norm": None,
    "sample_rate": None,
    "steps": 8,
    "accountant": None,
    "epsilon_rdp_check": None,
    "epsilon_composition_bound": None,
    "step_epsilon": None,
    "step_epsilon_amplified": None,
    "steps_planned": None,
    "epochs": 2,
    "train_size": 100,
    "best_epoch": 2,
    "val_accuracy": 0.5,
    "test_accuracy": 0.6,
    "test_macro_f1": 0.5,
    "test_qwk": 0.4,
    "test_pred_histogram": [3, 2],
    "test_majority_share": 0.6,
    "train_seconds": 1.0,
    "device": "cpu",
    "collapsed": False,
    "run_name": "r",
    "mlflow_run_id": "abc",
    "mlflow_model_uri": "models:/m-1",
}


def test_a_file_written_before_the_schema_field_loads_as_version_1():
    Path("train.json").write_text(json.dumps(TRAIN))
    r = records.read(records.TrainRecord, Path("train.json"))
    assert r.schema_version == 1 and r.test_accuracy == 0.6 and r.value("epsilon") is None
    assert r.to_json()["schema"] == 1 and r["test_accuracy"] == 0.6 and "mlflow_run_id" in r


def test_a_renamed_key_is_an_error_not_a_blank():
    Path("train.json").write_text(json.dumps({**TRAIN, "test_acc": TRAIN["test_accuracy"]}))
    with pytest.raises(UserError, match=r"^w: train.json is not a TrainRecord \(key test_acc: Extra inputs"):
        records.read(records.TrainRecord, Path("train.json"), "w")
    r = records.TrainRecord.model_validate(TRAIN)
    with pytest.raises(KeyError, match="no field 'test_acc'"):
        r.value("test_acc")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "is not valid JSON"),
        ("[]", "is not a JSON object"),
        ('{"schema": 9}', "has record schema 9, this dpcam reads 1"),
    ],
)
def test_unreadable_files_are_one_line(text, message):
    Path("x.json").write_text(text)
    with pytest.raises(UserError) as e:
        records.read(records.TrainRecord, Path("x.json"))
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="missing nothere.json"):
        records.read(records.TrainRecord, Path("nothere.json"))


def test_infinite_epsilon_is_written_as_null_and_skipped_metrics_are_left_out():
    r = records.TrainRecord.model_validate({**TRAIN, "epsilon": math.inf})
    assert json.loads(r.write(Path("t.json")).read_text())["epsilon"] is None
    deg = {
        "n": 4,
        "accuracy": 0.5,
        "chance": 0.5,
        "majority_class": 0,
        "majority_share": 0.5,
        "pred_entropy": 1.0,
        "pred_histogram": [2, 2],
        "input_sensitivity": 0.1,
        "degenerate": False,
        "reasons": [],
    }
    e = records.ExplainRecord(
        run_name="r",
        dataset="d",
        data_dir="x",
        method="gradcam",
        target="prediction",
        images=4,
        avg_drop_pct=10.0,
        degeneracy=deg,
        degenerate=False,
        accuracy=0.5,
    )
    assert "map_agreement" not in e and e["avg_drop_pct"] == 10.0 and set(e["degeneracy"]) >= {"accuracy", "reasons"}
