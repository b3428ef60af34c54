"""Bounds before allocation (issue 22) in process: an mlp too large for its data's input is refused
before a layer is made. Through the job: tests/job/test_hostile_bounds.py."""

import pytest

from job import models
from job.errors import SettingsError


def test_an_mlp_too_large_for_its_input_is_refused_before_it_is_built():
    # one width of 65536 passes the settings' own bound; on 3 x 4096 x 4096 images it is 3.3e12 weights
    settings = type("Settings", (), {"hidden_sizes": [65536]})
    with pytest.raises(SettingsError, match="over the bound of 2,000,000,000") as refused:
        models.mlp(settings, (3, 4096, 4096), 10)
    assert "JOB_HIDDEN_SIZES=65536" in str(refused.value) and refused.value.exit_code == 2
