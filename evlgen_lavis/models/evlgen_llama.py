"""``evlgen_llama``: EVLGen with a LLaMA / Vicuna LLM, or any HF causal LM (AutoModelForCausalLM)."""
from evlgen_lavis.common import registry_once
from evlgen_lavis.models.evlgen import EVLGen
from evlgen_lavis.models.evlgen_opt import _types


@registry_once("model", "evlgen_llama")
class EVLGenLLaMA(EVLGen):
    PRETRAINED_MODEL_CONFIG_DICT = _types("evlgen_llama", ["pretrain_vicuna7b", "demo"])
