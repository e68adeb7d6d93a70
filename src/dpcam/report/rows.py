"""What the report's tables show: their rows (metric, label, decimals) and the mark of a degenerate model.

The rows are read from the stage records by key (:meth:`dpcam.report.runs.Run.value`): a key that no
record has is a KeyError when the table is built, never a blank row.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpcam.families import Column

DAGGER = "†"
DEGENERATE_NOTE = (
    f"{DAGGER} degenerate model in at least one seed (near-chance accuracy, one class for most "
    "predictions, or outputs that barely change with the input): metrics not meaningful"
)
DOUBLE_DAGGER = "‡"
UNDERTRAINED_NOTE = (
    f"{DOUBLE_DAGGER} undertrained in at least one seed: its validation accuracy was still rising at the end "
    "(the last quarter of the epochs beat every earlier epoch by more than 2 standard errors): more training "
    "would likely change its numbers"
)


@dataclass(frozen=True)
class Row:
    """One row of a report table: a record field (``key``), its label and the decimals of its cells."""

    key: str
    label: str
    decimals: int


# Table rows, in the paper's order first (Average Drop, Increase in Confidence, masked score).
ROWS: tuple[Row, ...] = (
    Row("avg_drop_pct", "Average Drop % ↓", 2),
    Row("increase_conf_pct", "Increase in Confidence % ↑", 2),
    Row("masked_score_pct", "Masked score % ↑", 2),
    Row("masked_accuracy_pct", "Masked accuracy % ↑", 2),
    Row("test_accuracy", "Test accuracy ↑", 3),
    Row("test_qwk", "QWK ↑", 3),
    Row("pointing_game", "Pointing game ↑", 3),
    Row("pointing_game_random", "Pointing game of a random map (chance)", 3),
    Row("map_agreement", "Map agreement (vs ε = ∞)", 3),
    Row("deletion_auc", "Deletion AUC ↓", 3),
    Row("insertion_auc", "Insertion AUC ↑", 3),
    Row("road_gap", "ROAD gap (LeRF − MoRF) ↑", 3),
    Row("avg_drop_random_pct", "Average Drop % of a random map (baseline)", 2),
    Row("increase_conf_random_pct", "Increase in Confidence % of a random map (baseline)", 2),
    Row("masked_score_random_pct", "Masked score % of a random map (baseline)", 2),
    Row("mask_sensitivity_pct", "Sensitivity to masking % (uniform map of the same mass)", 2),
    Row("confidence_y", "Confidence Y of the explained class", 3),
)
# The audit column group: rows added to a table when some run of it has audit.json (dpcam.audit).
AUDIT_ROWS: tuple[Row, ...] = (
    Row("mia_auc_loss", "MIA AUC (loss) ↓", 3),
    Row("mia_auc_loss_calibrated", "MIA AUC (calibrated loss) ↓", 3),
    Row("mia_auc_gradcam_variance", "MIA AUC (Grad-CAM variance) ↓", 3),
    Row("mia_auc_gradcam_entropy", "MIA AUC (Grad-CAM entropy) ↓", 3),
    Row("mia_auc_input_gradient", "MIA AUC (input gradient) ↓", 3),
    Row("mia_epsilon_lb", "Empirical ε lower bound (MIA, 95%)", 2),
)


def header(column: Column) -> str:
    """A column's heading: its label and seed count, a dagger when a run of it is degenerate, a double dagger
    when one is undertrained."""
    marks = (f" {DAGGER}" if column.degenerate else "") + (
        f" {DOUBLE_DAGGER}" if any(r.undertrained for r in column.runs) else ""
    )
    return f"{column.label} (n = {len(column.runs)}){marks}"
