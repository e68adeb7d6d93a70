"""The report's runs hold typed stage records: every key it reads is a record field, and invalid records are refused."""

import json
from pathlib import Path

import pytest

from dpcam import report as rep
from dpcam.errors import UserError
from dpcam.records import AuditRecord, ExplainRecord, TrainRecord
from dpcam.report import flat
from dpcam.report.runs import load_runs
from tests.report.fakes import fake_grid, write_fake_runs


def test_every_key_the_report_reads_is_a_record_field():
    fields = {*TrainRecord.model_fields, *ExplainRecord.model_fields, *AuditRecord.model_fields}
    keys = [m.key for m in rep.ROWS + rep.AUDIT_ROWS] + [*flat.EXPLAIN_KEYS, *flat.ACCURACY_KEYS]
    assert [k for k in keys if k not in fields] == []


def test_run_values_come_from_the_records():
    grid = fake_grid(seeds=[0])
    write_fake_runs(grid, audits=("gaussian",))
    runs = {r.spec.name: r for r in load_runs(grid)}
    g, none = runs["gaussian-eps1-smallcnn-s0"], runs["none-epsinf-smallcnn-s0"]
    assert g.value("avg_drop_pct") == 20.0 and g.value("test_accuracy") == 0.5 and g.value("mia_auc_loss") == 0.52
    assert none.audit is None and none.value("mia_auc_loss") is None  # not audited: a blank cell
    assert none.value("map_agreement") is None and none.value("epsilon") is None  # null in its records
    with pytest.raises(KeyError, match="test_acuracy"):
        g.value("test_acuracy")  # a misspelled row is an error, not a blank row


def test_an_invalid_record_is_one_line_naming_the_file_and_key():
    grid = fake_grid(seeds=[0])
    write_fake_runs(grid)
    path = Path("models/gaussian/gaussian-eps1-smallcnn-s0/train.json")
    data = json.loads(path.read_text())
    del data["test_accuracy"]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        rep.report(grid)
    msg = str(e.value)
    assert (
        "\n" not in msg and str(path) in msg and "test_accuracy" in msg and "grid run gaussian-eps1-smallcnn-s0" in msg
    )
    assert not Path("reports").exists()
