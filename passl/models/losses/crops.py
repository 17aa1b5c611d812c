"""The crop configuration every multi-crop loss (SwAV, DeepCluster-v2) is given."""
from passl.errors import ConfigError


def checked_crop_config(nmb_crops, crops_for_assign):
    """``(nmb_crops, crops_for_assign)`` as lists, after checking that the assignment crops
    are crop indices: ``nmb_crops`` counts the crops per resolution (as the MultiCrop
    transform yields them), ``crops_for_assign`` picks those whose targets are computed."""
    nmb_crops, crops_for_assign = list(nmb_crops), list(crops_for_assign)
    num_crops = sum(nmb_crops)
    if not crops_for_assign or any(not 0 <= c < num_crops for c in crops_for_assign):
        raise ConfigError(f"model.loss.crops_for_assign {crops_for_assign} must be "
                          f"non-empty crop indices below sum(nmb_crops) = {num_crops}")
    return nmb_crops, crops_for_assign
