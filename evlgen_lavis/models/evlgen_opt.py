"""``evlgen_opt``: EVLGen with an OPT-family LLM. A model type is a yaml in configs/models/evlgen_opt/."""
from evlgen_lavis.common import config_path, registry_once
from evlgen_lavis.models.evlgen import EVLGen


def _types(arch, names):
    return {n: config_path("models", arch, f"{n}.yaml") for n in names}


@registry_once("model", "evlgen_opt")
class EVLGenOPT(EVLGen):
    PRETRAINED_MODEL_CONFIG_DICT = _types(
        "evlgen_opt", ["pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "tiny"]
    )
