"""EVLGen models: the merging algorithm, the TomeFormer connector, encoders and the registered classes."""
from evlgen_lavis.models.evlgen import EVLGen  # noqa: F401
from evlgen_lavis.models.evlgen_llama import EVLGenLLaMA  # noqa: F401
from evlgen_lavis.models.evlgen_opt import EVLGenOPT  # noqa: F401
from evlgen_lavis.models.tome import bipartite_soft_matching, merge_wavg, parse_r  # noqa: F401
from evlgen_lavis.models.tomeformer import TomeFormer  # noqa: F401
from evlgen_lavis.models.evlgen_video import EVLGenVideo, EVLGenVideoLLaMA, EVLGenVideoOPT  # noqa: F401
