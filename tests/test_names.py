"""Every stage registry holds exactly the names config validates against (dpcam.names)."""

from dpcam import names


def test_models():
    from dpcam.models import MODELS

    assert set(MODELS) == set(names.MODELS)


def test_ldp_mechanisms():
    from dpcam.data.mechanisms import MECHANISMS

    assert set(MECHANISMS) == set(names.MECHANISMS)


def test_explain_methods_and_metrics():
    from dpcam.explain.methods import METHODS
    from dpcam.explain.metrics import METRICS

    assert set(METHODS) == set(names.EXPLAIN_METHODS)
    assert set(METRICS) == set(names.EXPLAIN_METRICS)


def test_audit_attacks():
    from dpcam.audit import ATTACKS

    assert set(ATTACKS) == set(names.ATTACKS)


def test_search_objectives():
    from dpcam.search import OBJECTIVES

    assert set(OBJECTIVES) == set(names.OBJECTIVES)


def test_schemes_and_modes():
    from dpcam.privacy.accounting import GAUSSIAN_ACCOUNTANTS

    assert set(GAUSSIAN_ACCOUNTANTS) == set(names.GAUSSIAN_ACCOUNTANTS)
    assert set(names.NOISED_SCHEMES) | set(names.UNGUARANTEED_SCHEMES) | {"clip-only"} == set(names.CLIPPED_SCHEMES)
    assert set(names.CLIPPED_SCHEMES) | set(names.UNCLIPPED_SCHEMES) == set(names.SCHEMES)
    assert set(names.CALIBRATED_SCHEMES) == set(names.NOISED_SCHEMES) | set(names.UNGUARANTEED_SCHEMES)


def test_families():
    from dpcam.families import FAMILIES

    assert tuple(FAMILIES) == names.FAMILIES
    assert {f"finetune-{s}" for s in names.FINETUNE_SCHEMES} <= set(FAMILIES)
