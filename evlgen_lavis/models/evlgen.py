"""EVLGen: frozen vision encoder -> TomeFormer -> frozen causal LLM, trained with the LM loss alone.

    image (B, 3, H, W) --frozen ViT--> (B, N, Cv) --TomeFormer--> (B, M, H) --llm_proj--> (B, M, D)
    [soft tokens ; bos prompt caption end_sym] --frozen LLM--> LM loss on the caption tokens only

Only ``tomeformer`` (with its vision LayerNorm and projection), ``llm_proj`` and, when ``beta > 0``, the
contrastive head (``itc_proj``, ``itc_temp``) train. The registered classes (evlgen_opt, evlgen_llama) are
this class with different default yamls.
"""
import contextlib
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from transformers import BertConfig

from lavis.models.base_model import BaseModel

from evlgen_lavis.models.assets import load_llm, resolve_bert
from evlgen_lavis.models.tomeformer import TomeFormer
from evlgen_lavis.models.vision import build_vision_encoder

IGNORE = -100
DEFAULT_VQA_PROMPT = "Question: {} Short answer:"


class EVLGen(BaseModel):
    PRETRAINED_MODEL_CONFIG_DICT: Dict[str, str] = {}

    def __init__(
        self,
        vision_encoder: str = "eva_clip_g",
        image_size: int = 224,
        vit_precision: str = "fp16",
        vision_options: Optional[dict] = None,
        tomeformer: Optional[dict] = None,
        llm: str = "facebook/opt-2.7b",
        llm_precision: str = "fp16",
        prompt: str = "",
        max_txt_len: int = 32,
        end_sym: Optional[str] = None,
        prepend_bos: bool = True,
        vqa_prompt: str = DEFAULT_VQA_PROMPT,
        beta: float = 0.0,
        contrastive_text_encoder: str = "builtin:minilm",
        autocast_dtype: str = "fp16",
    ):
        super().__init__()
        self.visual_encoder = build_vision_encoder(
            vision_encoder, image_size=image_size, precision=vit_precision, **(vision_options or {})
        )
        self.tomeformer = self._build_tomeformer(dict(tomeformer or {}), self.visual_encoder)
        self.num_soft_tokens = self.tomeformer.check_input_tokens(self.visual_encoder.num_tokens)

        self.llm_model, self.llm_tokenizer = load_llm(llm, llm_precision)
        self.llm_proj = nn.Linear(self.tomeformer.hidden_size, self.llm_model.get_input_embeddings().embedding_dim)

        tok = self.llm_tokenizer
        self.end_sym = tok.eos_token if end_sym is None else end_sym
        end_ids = tok(self.end_sym, add_special_tokens=False).input_ids
        if not end_ids:
            raise ValueError(f"end_sym {self.end_sym!r} encodes to no token with this tokenizer")
        self.eos_token_id = end_ids[-1]
        self.bos_ids = [tok.bos_token_id] if prepend_bos and tok.bos_token_id is not None else []
        self.prompt = prompt
        self.vqa_prompt = vqa_prompt
        self.max_txt_len = max_txt_len
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[autocast_dtype]

        self.beta = float(beta)
        if self.beta > 0:
            self._build_contrastive_head(contrastive_text_encoder)

    # -- construction ---------------------------------------------------------------------------------

    @staticmethod
    def _build_tomeformer(cfg: dict, encoder) -> TomeFormer:
        r = cfg.pop("r", 0)
        r = OmegaConf.to_object(r) if OmegaConf.is_config(r) else r
        bert = resolve_bert(cfg.pop("bert", None))
        num_layers = cfg.pop("num_layers", None)
        prop_attn = cfg.pop("prop_attn", False)
        overrides = OmegaConf.to_object(cfg.pop("config", {})) if OmegaConf.is_config(cfg.get("config")) \
            else cfg.pop("config", {})
        if cfg:
            raise ValueError(f"unknown model.tomeformer keys {sorted(cfg)}; known: bert, num_layers, r, prop_attn, config")
        common = dict(r=r, vision_width=encoder.num_features, class_token=encoder.class_token, prop_attn=prop_attn)
        if bert:
            return TomeFormer.from_bert(bert, num_layers=num_layers, **common, **overrides)
        config = BertConfig(**overrides)
        if num_layers is not None:
            config.num_hidden_layers = int(num_layers)
        return TomeFormer(config, **common)

    def _build_contrastive_head(self, name: str) -> None:
        from transformers import AutoTokenizer, BertModel

        path = resolve_bert(name)
        self.text_tokenizer = AutoTokenizer.from_pretrained(path)
        self.text_encoder = BertModel.from_pretrained(path, add_pooling_layer=False).eval()
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)
        self.itc_proj = nn.Linear(self.tomeformer.hidden_size, self.text_encoder.config.hidden_size)
        self.itc_temp = nn.Parameter(torch.tensor(0.07))

    @classmethod
    def from_config(cls, cfg):
        get = cfg.get
        model = cls(
            vision_encoder=get("vision_encoder", "eva_clip_g"),
            image_size=get("image_size", 224),
            vit_precision=get("vit_precision", "fp16"),
            vision_options=get("vision_options", None),
            tomeformer=get("tomeformer", None),
            llm=get("llm", "facebook/opt-2.7b"),
            llm_precision=get("llm_precision", "fp16"),
            prompt=get("prompt", ""),
            max_txt_len=get("max_txt_len", 32),
            end_sym=get("end_sym", None),
            prepend_bos=get("prepend_bos", True),
            vqa_prompt=get("vqa_prompt", DEFAULT_VQA_PROMPT),
            beta=get("beta", 0.0),
            contrastive_text_encoder=get("contrastive_text_encoder", "builtin:minilm"),
            autocast_dtype=get("autocast_dtype", "fp16"),
        )
        path = get("finetuned") if get("load_finetuned", False) else get("pretrained")
        if path:
            model.load_checkpoint(path)
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm_model.eval()  # frozen parts never train (the vision wrapper enforces it itself)
        if hasattr(self, "text_encoder"):
            self.text_encoder.eval()
        return self

    # -- pieces of the forward pass -------------------------------------------------------------------

    def maybe_autocast(self):
        if self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Frozen vision features (B, N, Cv). Deterministic for eval-processed images, hence cacheable."""
        with self.maybe_autocast():
            return self.visual_encoder(image.to(self.device))

    def vision_cache_key(self) -> str:
        """Identifies the frozen encoder's output, for feature caches."""
        return f"{self.visual_encoder.name}-{self.visual_encoder.num_tokens}x{self.visual_encoder.num_features}"

    def _batch_size(self, samples) -> int:
        if "image_embeds" in samples:
            return samples["image_embeds"].shape[0]
        if "image" not in samples:
            raise KeyError("samples need 'image' (B, 3, H, W) or cached 'image_embeds' (B, N, C)")
        return samples["image"].shape[0]

    def soft_prompts(self, samples):
        """Soft tokens in the LLM's embedding space: ((B, M, D), sizes (B, M, 1), tomeformer tokens (B, M, H))."""
        if "image_embeds" in samples:
            feats = samples["image_embeds"].to(self.device)  # cached frozen features
        else:
            feats = self.encode_image(samples["image"])  # (B, N, Cv)
        if feats.shape[1] != self.visual_encoder.num_tokens:
            raise ValueError(
                f"got {feats.shape[1]} vision tokens but {self.visual_encoder.name} at this image size gives "
                f"{self.visual_encoder.num_tokens}: check the processor's image_size against model.image_size"
            )
        with self.maybe_autocast():
            tokens, sizes = self.tomeformer(feats.float())  # (B, M, H), (B, M, 1)
            soft = self.llm_proj(tokens)  # (B, M, D)
        return soft.to(self.llm_model.dtype), sizes, tokens

    def _texts(self, samples, key: str = "text_input") -> List[str]:
        texts = samples.get(key)
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError(f"samples['{key}'] is empty or missing: give one string per image")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"samples['{key}'] must be strings, got {[type(t).__name__ for t in texts][:4]}")
        n = self._batch_size(samples)
        if len(texts) != n:
            raise ValueError(f"batch-size mismatch: {n} images but {len(texts)} entries in samples['{key}']")
        return list(texts)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm_model.get_input_embeddings()(ids.to(self.device))

    def _caption_targets(self, captions: Sequence[str]):
        """Right-padded ids (B, T), mask (B, T) and labels (B, T) for [bos] prompt caption end_sym; only the
        caption and end_sym are supervised."""
        tok = self.llm_tokenizer
        n_prompt = len(self.bos_ids) + len(tok(self.prompt, add_special_tokens=False).input_ids)
        sep = " " if self.prompt and not self.prompt.endswith(" ") else ""
        texts = [self.prompt + sep + c.strip() + self.end_sym for c in captions]
        rows = tok(texts, add_special_tokens=False, truncation=True,
                   max_length=self.max_txt_len - len(self.bos_ids)).input_ids
        rows = [self.bos_ids + r for r in rows]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, IGNORE)
        labels[:, :n_prompt] = IGNORE
        return ids, mask, labels

    def _prefix(self, prompts: Sequence[str]):
        """Left-padded prompt ids (B, P) and mask for generation."""
        tok = self.llm_tokenizer
        rows = [self.bos_ids + tok(p, add_special_tokens=False).input_ids for p in prompts]
        P = max(len(r) for r in rows)
        ids = torch.full((len(rows), P), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), P), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, P - len(r):] = torch.tensor(r)
                mask[i, P - len(r):] = 1
        return ids, mask

    @staticmethod
    def _left_align(embeds: torch.Tensor, mask: torch.Tensor):
        """Move padding (mask 0) to the left of each row, keeping the order of the real tokens."""
        order = torch.sort(mask, dim=1, stable=True).indices  # zeros first
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        return embeds, mask.gather(1, order)

    # -- training -------------------------------------------------------------------------------------

    def forward(self, samples):
        captions = self._texts(samples)
        soft, sizes, tokens = self.soft_prompts(samples)  # (B, M, D)
        B, M, _ = soft.shape
        ids, mask, labels = self._caption_targets(captions)  # (B, T)
        inputs = torch.cat([soft, self._embed(ids)], dim=1)  # (B, M + T, D)
        attention = torch.cat([torch.ones(B, M, dtype=torch.long), mask], dim=1).to(self.device)
        labels = torch.cat([torch.full((B, M), IGNORE, dtype=torch.long), labels], dim=1).to(self.device)
        with self.maybe_autocast():
            loss = self._lm_loss(inputs, attention, labels)
        result = {"loss_lm": loss}
        if self.beta > 0:
            result["loss_itc"] = self._contrastive_loss(tokens, sizes, captions)
            loss = loss + self.beta * result["loss_itc"]
        result["loss"] = loss
        return result

    def _lm_loss(self, inputs: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the supervised positions. Equal to the HF model's own loss,
        but the vocabulary projection runs only where a label exists (the caption tokens), not over the
        soft tokens, prompt and padding: most of the sequence, and a (B, L, V) logits tensor saved."""
        hidden = self.llm_model.get_decoder()(
            inputs_embeds=inputs, attention_mask=attention, return_dict=True
        ).last_hidden_state  # (B, L, D), after the final norm
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE  # (B, L - 1)
        logits = self.llm_model.get_output_embeddings()(hidden[:, :-1][keep])  # (K, V)
        return F.cross_entropy(logits.float(), targets[keep])

    def _contrastive_loss(self, tokens: torch.Tensor, sizes: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Symmetric InfoNCE between pooled soft tokens and a frozen sentence encoder's text features,
        against the texts and images of every rank."""
        import torch.distributed as dist

        pooled = (tokens * sizes).sum(1) / sizes.sum(1)  # size-weighted mean over merged tokens (B, H)
        img = F.normalize(self.itc_proj(pooled.float()), dim=-1)  # (B, Dt)
        with torch.no_grad():
            enc = self.text_tokenizer(list(captions), padding=True, truncation=True, max_length=64,
                                      return_tensors="pt").to(self.device)
            hidden = self.text_encoder(**enc).last_hidden_state  # (B, L, Dt)
            m = enc["attention_mask"][..., None].to(hidden.dtype)
            txt = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).float()  # (B, Dt)
        rank, offset = 0, 0
        img_all, txt_all = img, txt
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_gather

            img_all = torch.cat(all_gather(img), dim=0)  # gradients flow back to every rank
            gathered = [torch.empty_like(txt) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, txt)
            txt_all = torch.cat(gathered, dim=0)
            rank = dist.get_rank()
            offset = rank * img.shape[0]
        temp = self.itc_temp.clamp(0.001, 0.5)
        targets = torch.arange(img.shape[0], device=img.device) + offset
        loss_i2t = F.cross_entropy(img @ txt_all.t() / temp, targets)
        loss_t2i = F.cross_entropy(txt @ img_all.t() / temp, targets)
        return (loss_i2t + loss_t2i) / 2

    # -- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate(self, samples, prompts: Sequence[str], **gen_kwargs) -> List[str]:
        soft, _, _ = self.soft_prompts(samples)  # (B, M, D)
        B, M, _ = soft.shape
        ids, mask = self._prefix(prompts)  # (B, P), left-padded
        inputs = torch.cat([soft, self._embed(ids)], dim=1)
        attention = torch.cat([torch.ones(B, M, dtype=torch.long), mask], dim=1).to(self.device)
        inputs, attention = self._left_align(inputs, attention)  # [pad ... soft prompt]
        with self.maybe_autocast():
            out = self.llm_model.generate(
                inputs_embeds=inputs, attention_mask=attention, eos_token_id=self.eos_token_id,
                pad_token_id=self.llm_tokenizer.pad_token_id, **gen_kwargs,
            )
        texts = self.llm_tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts]  # generation stops at end_sym; padding tokens are special

    def generate(
        self,
        samples,
        use_nucleus_sampling: bool = False,
        num_beams: int = 5,
        max_length: int = 30,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        num_captions: int = 1,
        temperature: float = 1.0,
    ) -> List[str]:
        """Captions, ``num_captions`` per image in order (a flat list of B * num_captions strings).
        ``samples["prompt"]`` (a string or one per image) overrides the model's prompt."""
        B = self._batch_size(samples)
        prompt = samples.get("prompt", self.prompt)
        prompts = [prompt] * B if isinstance(prompt, str) else list(prompt)
        if len(prompts) != B:
            raise ValueError(f"batch-size mismatch: {B} images but {len(prompts)} prompts")
        if num_captions > num_beams and not use_nucleus_sampling:
            raise ValueError(f"num_captions={num_captions} needs num_beams >= num_captions for beam search")
        kwargs = dict(
            do_sample=use_nucleus_sampling, num_beams=num_beams, max_new_tokens=max_length,
            min_new_tokens=min_length, repetition_penalty=repetition_penalty,
            num_return_sequences=num_captions,
        )
        if use_nucleus_sampling:
            kwargs.update(top_p=top_p, temperature=temperature)
        if num_beams > 1:
            kwargs["length_penalty"] = length_penalty
        return self._generate(samples, prompts, **kwargs)

    def predict_answers(
        self,
        samples,
        num_beams: int = 5,
        inference_method: str = "generate",
        max_len: int = 10,
        min_len: int = 1,
        num_ans_candidates: int = 128,
        answer_list=None,
        prompt: str = "",
        length_penalty: float = 0.0,
        **kwargs,
    ) -> List[str]:
        """Zero-shot VQA: the question goes into ``prompt`` (default "Question: {} Short answer:")."""
        if inference_method != "generate":
            raise ValueError(f"inference_method {inference_method!r} is not supported: EVLGen answers by generation")
        questions = self._texts(samples, "text_input")
        prompt = prompt or self.vqa_prompt
        prompts = [prompt.format(q) if "{}" in prompt else prompt + q for q in questions]
        kwargs = dict(do_sample=False, num_beams=num_beams, max_new_tokens=max_len, min_new_tokens=min_len)
        if num_beams > 1:
            kwargs["length_penalty"] = length_penalty
        answers = self._generate(samples, prompts, **kwargs)
        return [a.split("\n")[0].strip() for a in answers]

    # -- checkpoints ----------------------------------------------------------------------------------

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """The parameters that train (what a checkpoint holds); frozen weights come from their sources."""
        return {k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad}

    def load_checkpoint(self, url_or_filename: str):
        """Load a LAVIS-style checkpoint ({"model": state_dict, ...} or a bare state dict) that holds the
        trainable parameters (frozen ones may be present too). Unknown keys, or trainable parameters the
        file lacks, are errors."""
        if not os.path.isfile(url_or_filename):
            raise FileNotFoundError(f"checkpoint {url_or_filename!r} does not exist")
        try:
            ckpt = torch.load(url_or_filename, map_location="cpu", weights_only=True)
        except Exception:  # a LAVIS checkpoint with its OmegaConf config: trusted, user-provided file
            ckpt = torch.load(url_or_filename, map_location="cpu", weights_only=False)
        state = ckpt.get("model", ckpt)
        own = dict(self.named_parameters())
        own_all = self.state_dict()
        unexpected = [k for k in state if k not in own_all]
        if unexpected:
            raise KeyError(
                f"checkpoint {url_or_filename} has {len(unexpected)} keys this model lacks, e.g. {unexpected[:5]}: "
                "was it saved from a different model type?"
            )
        missing = [k for k, p in own.items() if p.requires_grad and k not in state]
        if missing:
            raise KeyError(
                f"checkpoint {url_or_filename} lacks {len(missing)} trainable parameters, e.g. {missing[:5]}"
            )
        msg = self.load_state_dict(state, strict=False)
        logging.info("loaded %d tensors from %s", len(state), url_or_filename)
        return msg
