"""The traps of issue 24 that are a model's business, in process: JOB_FREEZE=N within the
model's stages, and the hint for photos left on the default mlp."""

import pytest
import torchvision

from job import models
from job.errors import SettingsError
from job.settings import Settings


@pytest.mark.parametrize("name, stages", [("resnet18", 6), ("efficientnet_b0", 9)])
def test_freeze_accepts_n_below_the_models_stages_and_refuses_the_rest(name, stages):
    with models.shapes_only():
        model = torchvision.models.get_model(name)
    head = models.head_name(model)
    frozen = models.freeze(model, head, str(stages - 1))
    assert len(frozen) == 1  # the first stage alone
    for too_many in (stages, stages + 3):
        with pytest.raises(SettingsError, match=f"JOB_FREEZE={too_many}: .* has {stages} backbone stage.*1 to "
                                                f"{stages - 1}; JOB_FREEZE=none trains them all"):
            models.freeze(model, head, str(too_many))


def test_the_mlp_hint_is_for_colour_images_when_job_model_was_left_unset():
    unset = Settings(data_uri="/data/photos")
    chosen = Settings(data_uri="/data/photos", model="mlp")
    hint = models.model_hint(unset, (3, 224, 224))
    assert hint and "150,528 flat inputs" in hint and "JOB_MODEL=resnet18" in hint
    assert models.model_hint(chosen, (3, 224, 224)) is None  # asked for by name
    assert models.model_hint(unset, (1, 28, 28)) is None  # MNIST-format digits: the mlp is their recipe
