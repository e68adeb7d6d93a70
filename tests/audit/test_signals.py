"""Who the audit attacks: the member / non-member samples, and the attack registry."""

import numpy as np
import pytest

from dpcam import names
from dpcam.audit import signals as A
from dpcam.errors import UserError
from tests.conftest import make_tiny


def test_attack_registry_matches_the_names_config_validates():
    assert set(A.ATTACKS) == set(names.ATTACKS)


def test_members_are_the_images_the_run_trained_on_and_class_matched():
    from dpcam.data.store import load_dataset

    data = load_dataset(make_tiny(n=300))
    used = data.split("train").subset(50).indices  # what train.fit trains on with train_size 50
    members, non = A.sample_groups(data, 1000, seed=3, train_size=50)
    assert set(members) <= set(used) and set(non) <= set(data.split("test").indices)
    assert members.size == non.size == 50 and np.array_equal(
        np.bincount(data.labels[members]), np.bincount(data.labels[non])
    )
    m2, _ = A.sample_groups(data, 20, seed=3)
    assert m2.size == 20 and set(m2) <= set(data.split("train").indices)
    with pytest.raises(UserError, match="at least 10 class-matched"):
        A.sample_groups(load_dataset(make_tiny(name="few", n=30)), 1000, 0)
