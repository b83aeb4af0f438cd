"""LAVIS's BLIP-2 built offline, on the same frozen backbones as EVLGen (benchmarks only).

LAVIS 1.0.2's constructors download bert-base-uncased (``Blip2Base.init_tokenizer`` / ``init_Qformer``) and
the EVA weights (``create_eva_vit_g``). Here the same pieces are built from configs, and the frozen vision
encoder and LLM are *passed in*, so BLIP-2 and EVLGen run on the very same module objects:

- :func:`qformer_config` / :func:`build_qformer`: LAVIS's Q-Former (``lavis.models.blip2_models.Qformer.
  BertLMHeadModel``, cross-attention every ``cross_attention_freq`` layers, learned queries), random or
  initialised from any local BERT folder (BLIP-2 initialises it from bert-base-uncased; the demo from MiniLM),
  with the query FFN copied from the text FFN exactly as ``Blip2Qformer.__init__`` does.
- :class:`OfflineBlip2Qformer`: stage 1; ``forward`` is LAVIS's ``Blip2Qformer.forward`` (ITC + ITM + ITG)
  unchanged. It calls ``torch.distributed``: use :func:`init_single_process_group` first.
- :class:`OfflineBlip2OPT`: stage 2; ``forward`` is LAVIS's ``Blip2OPT.forward`` unchanged (any HF OPT
  ``OPTForCausalLM`` as the LLM). ``generate`` is LAVIS's when the LLM is LAVIS's own OPT copy
  (``lavis.models.blip2_models.modeling_opt``; it needs ``query_embeds``), and :meth:`OfflineBlip2OPT.
  generate_embeds` is the same algorithm through ``inputs_embeds`` for a stock HF OPT (what later LAVIS
  versions do), so that both models can be timed on one LLM module.
- :class:`QFormerConnector`: a Q-Former with the TomeFormer's interface (``forward(feats) -> (tokens,
  sizes)``), to put BLIP-2's connector into the EVLGen harness in front of any LLM (LAVIS's Blip2OPT is
  OPT-only; the demo LLM is LLaMA-architecture SmolLM2).
- :func:`build_evlgen`: EVLGen's own constructor with the frozen encoder and LLM supplied.
"""
import contextlib
import os
import re
import tempfile
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn

from lavis.models.blip2_models.blip2 import LayerNorm
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from lavis.models.blip2_models.Qformer import BertLMHeadModel
from transformers import BertConfig, BertTokenizer


def init_single_process_group():
    """LAVIS's ``Blip2Qformer.forward`` calls ``dist.get_rank()`` and ``all_gather``: a world of one."""
    if dist.is_available() and not dist.is_initialized():
        fd, path = tempfile.mkstemp(prefix="evlgen-bench-pg-")
        os.close(fd)
        os.remove(path)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)


def bert_tokenizer(path):
    """``Blip2Base.init_tokenizer`` from a local folder (bert-base-uncased WordPiece, + "[DEC]" as bos)."""
    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def qformer_config(vision_width, num_query_token, cross_attention_freq=2, base=None, **overrides):
    """``Blip2Base.init_Qformer``'s config: a BERT config (``base``: a folder, or None for BertConfig()
    defaults = bert-base shape) plus cross-attention to ``vision_width`` every ``cross_attention_freq``
    layers and ``num_query_token`` queries."""
    config = BertConfig.from_pretrained(base) if base else BertConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq
    config.query_length = num_query_token
    return config


QFORMER_NEW_KEYS = re.compile(r"crossattention|_query|^cls\.|(^|\.)position_ids$")


def build_qformer(config, bert_path=None, vocab_size=None):
    """(Q-Former ``BertLMHeadModel``, query tokens (1, Q, H)) as in ``init_Qformer`` + ``Blip2Qformer.__init__``:
    weights from ``bert_path`` (a local BERT folder; cross-attention stays random) or random; token
    embeddings resized to ``vocab_size`` (the tokenizer with "[DEC]"); query FFN = copy of the text FFN."""
    if bert_path:
        qformer, info = BertLMHeadModel.from_pretrained(bert_path, config=config, output_loading_info=True)
        # transformers initialises keys it could not load at random instead of failing: only the parts BLIP-2
        # adds to BERT (cross-attention, the query FFN) and the MLM head a sentence encoder lacks may be missing.
        unexpected = [k for k in info["missing_keys"] if not QFORMER_NEW_KEYS.search(k)]
        if unexpected:
            raise RuntimeError(f"{bert_path} did not provide these Q-Former weights (a prefix or shape mismatch?): "
                               f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        # transformers >= 4.3x loads on the meta device and does not re-tie LAVIS's decoder bias (absent
        # from a sentence-encoder checkpoint): tie it again, as the class's __init__ does.
        head = qformer.cls.predictions
        head.bias.data.zero_()
        head.decoder.bias = head.bias
    else:
        qformer = BertLMHeadModel(config)
    if vocab_size is not None and vocab_size != config.vocab_size:
        qformer.resize_token_embeddings(vocab_size)
        qformer.cls.predictions.bias = qformer.cls.predictions.decoder.bias
    meta = [n for n, t in list(qformer.named_parameters()) + list(qformer.named_buffers()) if t.is_meta]
    if bert_path and meta:
        raise RuntimeError(f"Q-Former tensors left uninitialised (meta) after loading {bert_path}: {meta}")
    state = qformer.state_dict()
    for name, param in qformer.named_parameters():
        if "_query" in name:
            param.data.copy_(state[name.replace("_query", "")])
    query_tokens = nn.Parameter(torch.zeros(1, config.query_length, config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return qformer, query_tokens


def strip_for_stage2(qformer):
    """What ``Blip2OPT.__init__`` removes from the Q-Former: the text side (LM head, word and position
    embeddings, the text FFN). Only the queries pass through it in stage 2."""
    qformer.cls = None
    qformer.bert.embeddings.word_embeddings = None
    qformer.bert.embeddings.position_embeddings = None
    for layer in qformer.bert.encoder.layer:
        layer.output = None
        layer.intermediate = None
    return qformer


class OfflineBlip2Qformer(Blip2Qformer):
    """LAVIS's stage-1 model with injected parts; ``forward`` (ITC + ITM + ITG) is LAVIS's own.
    ``visual_encoder`` may be ``nn.Identity()`` when samples["image"] holds cached features (B, N, C)."""

    def __init__(self, visual_encoder, vision_width, qformer, query_tokens, tokenizer, embed_dim=256,
                 max_txt_len=32):
        nn.Module.__init__(self)
        self.tokenizer = tokenizer
        self.visual_encoder = visual_encoder
        self.ln_vision = LayerNorm(vision_width)
        self.Qformer, self.query_tokens = qformer, query_tokens
        hidden = qformer.config.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = max_txt_len


class OfflineBlip2OPT(Blip2OPT):
    """LAVIS's stage-2 model with injected parts; ``forward`` is LAVIS's own. ``opt_model``: a frozen
    OPT (HF's ``OPTForCausalLM`` or LAVIS's copy), ``opt_tokenizer``: its tokenizer (it must add a start
    token, as OPT's does; GPT-2's BPE with ``add_bos_token=True`` does)."""

    def __init__(self, visual_encoder, vision_width, qformer, query_tokens, opt_model, opt_tokenizer,
                 prompt="", max_txt_len=32, ln_vision=None):
        nn.Module.__init__(self)
        self.visual_encoder = visual_encoder
        self.ln_vision = ln_vision if ln_vision is not None else LayerNorm(vision_width)
        self.Qformer, self.query_tokens = strip_for_stage2(qformer), query_tokens
        self.opt_tokenizer = opt_tokenizer
        self.opt_model = opt_model
        for param in self.opt_model.parameters():
            param.requires_grad = False
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.opt_proj = nn.Linear(self.Qformer.config.hidden_size, self.opt_model.config.hidden_size)
        self.max_txt_len = max_txt_len
        self.prompt = prompt
        self.prompt_length = self.opt_tokenizer(self.prompt, return_tensors="pt").attention_mask.sum(1)

    def query_output(self, image):
        """(B, Q, D) soft prompts, as computed in LAVIS's forward/generate."""
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        with self.maybe_autocast():
            out = self.Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts, return_dict=True)
            return self.opt_proj(out.last_hidden_state)

    @torch.no_grad()
    def generate_embeds(self, samples, max_length=30, min_length=1, num_beams=1):
        """LAVIS's ``Blip2OPT.generate`` (greedy/beam) through ``inputs_embeds``, for a stock HF OPT."""
        image = samples["image"]
        inputs_opt = self.query_output(image)  # (B, Q, D)
        prompt = [samples.get("prompt", self.prompt)] * image.size(0)
        tokens = self.opt_tokenizer(prompt, return_tensors="pt").to(image.device)
        embeds = self.opt_model.get_input_embeddings()(tokens.input_ids)
        inputs = torch.cat([inputs_opt.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([torch.ones(inputs_opt.shape[:2], dtype=torch.long, device=image.device),
                          tokens.attention_mask], dim=1)
        with self.maybe_autocast():
            out = self.opt_model.generate(
                inputs_embeds=inputs, attention_mask=mask, do_sample=False, num_beams=num_beams,
                max_new_tokens=max_length, min_new_tokens=min_length, eos_token_id=self.eos_token_id,
                pad_token_id=self.opt_tokenizer.pad_token_id,
            )
        return [t.strip() for t in self.opt_tokenizer.batch_decode(out, skip_special_tokens=True)]


def lavis_opt_sharing_weights(hf_opt):
    """LAVIS 1.0.2's own OPT class (``modeling_opt.OPTForCausalLM``, needed by its ``Blip2OPT.generate``)
    holding the very tensors of an HF OPT (no copy)."""
    from lavis.models.blip2_models.modeling_opt import OPTConfig, OPTForCausalLM

    config = OPTConfig(**hf_opt.config.to_dict())
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    state = dict(hf_opt.state_dict(keep_vars=True))
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise RuntimeError(f"LAVIS OPT tensors with no HF counterpart: {missing[:5]}")
    model.lm_head.weight = model.model.decoder.embed_tokens.weight  # tied, as in OPT
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class QFormerConnector(nn.Module):
    """BLIP-2's connector (ln_vision -> Q-Former over learned queries) with the TomeFormer's interface, so
    that it can sit in the EVLGen harness (same LLM code, same loss, same generation) in front of any LLM.

        feats (B, N, Cv) -> LayerNorm -> Q-Former(queries (B, Q, H) x-attend feats) -> ((B, Q, H), ones (B, Q, 1))
    """

    def __init__(self, qformer, query_tokens, vision_width, ln_vision=None):
        super().__init__()
        self.ln_vision = ln_vision if ln_vision is not None else LayerNorm(vision_width)
        self.bert = qformer.bert
        self.query_tokens = query_tokens

    @property
    def hidden_size(self):
        return self.bert.config.hidden_size

    @property
    def num_queries(self):
        return self.query_tokens.shape[1]

    def check_input_tokens(self, num_tokens):
        return self.num_queries

    def forward(self, feats):
        image_embeds = self.ln_vision(feats)  # (B, N, Cv)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=feats.device)
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)  # (B, Q, H)
        out = self.bert(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=atts,
                        return_dict=True).last_hidden_state  # (B, Q, H)
        return out, out.new_ones(out.shape[0], out.shape[1], 1)


def build_evlgen(vision, llm, tokenizer, tomeformer, **kwargs):
    """``EVLGen(...)`` through its own constructor, with the frozen encoder (a ``FrozenVisionEncoder``) and
    the frozen LLM + tokenizer supplied instead of built by name (shared with other models)."""
    import evlgen_lavis.models.evlgen as E

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(E, "build_vision_encoder", lambda *a, **k: vision))
        stack.enter_context(mock.patch.object(E, "load_llm", lambda *a, **k: (llm, tokenizer)))
        return E.EVLGen(vision_encoder=vision.name, tomeformer=tomeformer, llm="<shared>", **kwargs)


def with_connector(model, connector):
    """Replace an EVLGen model's TomeFormer by ``connector`` (e.g. a :class:`QFormerConnector`) and give it a
    fresh ``llm_proj``: BLIP-2's connector in EVLGen's harness."""
    model.tomeformer = connector
    model.llm_proj = nn.Linear(connector.hidden_size, model.llm_model.get_input_embeddings().embedding_dim)
    model.num_soft_tokens = connector.check_input_tokens(model.visual_encoder.num_tokens)
    return model
