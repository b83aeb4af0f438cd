"""Caption metrics computed offline with pycocoevalcap's scorers.

``COCOEvalCap.evaluate()`` builds SPICE up front, and SPICE downloads Stanford CoreNLP on first use, so
it crashes on a machine without internet before computing anything. LAVIS's ``coco_caption_eval`` also
downloads the COCO ground truth. Here the scorers are called directly on ground truth the caller
provides, which gives the same numbers as ``COCOEvalCap`` for BLEU-1..4, METEOR, ROUGE-L and CIDEr.

Java is needed by the official PTB tokenizer, METEOR and SPICE. Without Java the tokenizer falls back to
:func:`simple_ptb_tokenize` (an approximation) and METEOR/SPICE are skipped with a logged warning.
"""
import logging
import os
import re
import shutil
import string

# The metric groups :func:`compute_caption_metrics` knows, and the keys each one reports.
METRIC_KEYS = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
    "exact_match": ("exact_match",),
}
DEFAULT_METRICS = ("bleu", "meteor", "rouge", "cider", "exact_match")

# Tokens the official PTBTokenizer wrapper removes after tokenising (pycocoevalcap's PUNCTUATIONS).
# Like the official wrapper (which lowercases before filtering), "-lrb-"/"-rrb-" are kept.
_PTB_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTION = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CONTRACTION_TOKENS = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}
# Words PTB keeps whole although they contain periods: initialisms (u.s., e.g.) and common titles.
_ABBREV = re.compile(r"(?:[a-z]\.){2,}|(?:mr|mrs|ms|dr|jr|sr|vs|etc|inc|corp|ltd)\.")
# Punctuation split off words: "..." and "--" as units; "." and "," except inside numbers (2.5, 1,000).
_SPLIT_PUNCT = re.compile(r"(\.\.\.|--|(?<!\d)[.,]|[.,](?!\d)|[?!]+|[:;\"`])")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def java_available():
    """True when a ``java`` executable is on PATH (PTB tokenizer, METEOR and SPICE need it)."""
    return shutil.which("java") is not None


def spice_available():
    """True when SPICE can run without downloading: Java plus the Stanford CoreNLP jars that
    pycocoevalcap's ``get_stanford_models`` would otherwise download into ``spice/lib``."""
    try:
        import pycocoevalcap.spice.get_stanford_models as gsm
    except ImportError:
        return False
    lib = os.path.join(os.path.dirname(gsm.__file__), gsm.SPICELIB)
    jars = [os.path.join(lib, f"{gsm.JAR}.jar"), os.path.join(lib, f"{gsm.JAR}-models.jar")]
    return java_available() and all(os.path.exists(j) for j in jars)


def normalize_caption(text):
    """Normalisation for exact match: lowercase, delete ASCII punctuation, collapse whitespace."""
    return " ".join(str(text).lower().translate(_PUNCT_TABLE).split())


def exact_match_accuracy(gts, res):
    """Fraction (0..1) of ids whose generated caption equals any reference after
    :func:`normalize_caption`. ``gts``: id -> list of references; ``res``: id -> caption."""
    if not res:
        raise ValueError("exact_match_accuracy: no predictions")
    hits = 0
    for img_id, caption in res.items():
        refs = {normalize_caption(r) for r in gts[img_id]}
        hits += normalize_caption(caption) in refs
    return hits / len(res)


def simple_ptb_tokenize(text):
    """A pure-Python approximation of pycocoevalcap's ``PTBTokenizer`` for one sentence (used only when
    Java is missing): lowercase, brackets to ``-lrb-`` etc., contractions split (``don't`` -> ``do n't``),
    punctuation split off and the punctuation tokens the official wrapper removes dropped."""
    text = str(text).lower().replace("\n", " ").replace("\t", " ")
    for bracket, token in _BRACKETS.items():
        text = text.replace(bracket, f" {token} ")
    text = re.sub(r"\bcannot\b", "can not", text).replace("$", " $ ")
    text = _CONTRACTION.sub(r" \1", text)
    tokens = []
    for word in text.split():
        pieces = [word] if _ABBREV.fullmatch(word) else _SPLIT_PUNCT.sub(r" \1 ", word).split()
        for tok in pieces:
            if tok not in _PTB_DROP and tok not in _CONTRACTION_TOKENS:
                tok = tok.strip("'")  # quote marks around a word
            if tok and tok not in _PTB_DROP and tok != '"' and set(tok) - set(".-"):
                tokens.append(tok)
    return " ".join(tokens)


def tokenize_captions(captions, tokenizer="auto"):
    """Tokenise ``{id: [caption, ...]}`` like COCOEvalCap does.

    ``tokenizer``: "ptb" (pycocoevalcap's Java PTBTokenizer), "python" (:func:`simple_ptb_tokenize`)
    or "auto" (PTB when Java is available, else python with a warning).
    """
    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', got {tokenizer!r}")
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "python"
        if tokenizer == "python":
            logging.warning("java not found: using a pure-Python approximation of the PTB tokenizer; "
                            "scores can differ slightly from COCOEvalCap's. Install Java to match it.")
    if tokenizer == "python":
        return {k: [simple_ptb_tokenize(c) for c in caps] for k, caps in captions.items()}
    if not java_available():
        raise RuntimeError("tokenizer='ptb' needs Java (pycocoevalcap's PTBTokenizer runs Stanford "
                           "CoreNLP); install a JRE or use tokenizer='python'")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def _check_inputs(gts, res):
    if not res:
        raise ValueError("compute_caption_metrics: no predictions to score (res is empty)")
    unknown = [k for k in res if k not in gts]
    if unknown:
        raise KeyError(f"{len(unknown)} predicted ids have no reference captions, e.g. {unknown[:5]!r}; "
                       "check that results and annotations use the same image_id (ids are compared "
                       "exactly: 5 and '5' differ)")
    empty = [k for k in res if not gts[k]]
    if empty:
        raise ValueError(f"{len(empty)} ids have no reference captions, e.g. {empty[:5]!r}; a split "
                         "without captions cannot be scored (for the tasks: set run.report_metric: false)")
    missing = len(gts) - len(res)
    if missing > 0:
        logging.warning("%d of %d annotated images have no prediction; scoring the %d predicted ones",
                        missing, len(gts), len(res))


def _run_meteor(gts_tok, res_tok):
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts_tok, res_tok)
    finally:
        del scorer  # Meteor.__del__ stops the Java subprocess
    return score


def compute_caption_metrics(gts, res, use_spice=False, metrics=None, tokenizer="auto",
                            extra_metrics=None):
    """Score generated captions against references, like COCOEvalCap without downloads.

    Args:
        gts: ``{id: [reference caption, ...]}`` (raw text). Ids may be ints or strings.
        res: ``{id: generated caption}`` (raw text); every id must be in ``gts``. Ids of ``gts`` without
            a prediction are left out (with a warning).
        use_spice: also compute SPICE if it can run offline (:func:`spice_available`); else warn.
        metrics: iterable of metric groups from :data:`METRIC_KEYS` (default :data:`DEFAULT_METRICS`).
        tokenizer: see :func:`tokenize_captions`.
        extra_metrics: optional ``{name: fn(gts, res) -> float}`` computed on the raw text (the hook
            behind "exact_match"; add e.g. a keyword accuracy here).

    Returns:
        ``{"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", ["SPICE"], "exact_match", ...}`` as floats;
        all in 0..1 except CIDEr (0..10). Metrics that cannot run (no Java) are absent.
        Note CIDEr's idf comes from the references of the scored images themselves: on a single
        image every n-gram has idf log(1/1) = 0 and CIDEr is 0.
    """
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    unknown = set(metrics) - set(METRIC_KEYS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; choose from {sorted(METRIC_KEYS)}")
    if use_spice and "spice" not in metrics:
        metrics.append("spice")
    _check_inputs(gts, res)
    gts = {k: list(gts[k]) for k in res}
    res = {k: str(v) for k, v in res.items()}

    out = {}
    if "exact_match" in metrics:
        out["exact_match"] = exact_match_accuracy(gts, res)
    for name, fn in (extra_metrics or {}).items():
        out[name] = float(fn(gts, res))

    scored = [m for m in metrics if m not in ("exact_match",)]
    if not scored:
        return out
    tokenized = tokenize_captions({**{("gt", k): v for k, v in gts.items()},
                                   **{("res", k): [v] for k, v in res.items()}}, tokenizer)
    gts_tok = {k: tokenized[("gt", k)] for k in res}
    res_tok = {k: tokenized[("res", k)] for k in res}

    if "bleu" in scored:
        from pycocoevalcap.bleu.bleu import Bleu

        bleus, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
        out.update({f"Bleu_{i + 1}": float(b) for i, b in enumerate(bleus)})
    if "meteor" in scored:
        if java_available():
            out["METEOR"] = float(_run_meteor(gts_tok, res_tok))
        else:
            logging.warning("java not found: METEOR skipped (install a Java runtime to compute it)")
    if "rouge" in scored:
        from pycocoevalcap.rouge.rouge import Rouge

        out["ROUGE_L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    if "cider" in scored:
        from pycocoevalcap.cider.cider import Cider

        out["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])
    if "spice" in scored:
        if spice_available():
            from pycocoevalcap.spice.spice import Spice

            out["SPICE"] = float(Spice().compute_score(gts_tok, res_tok)[0])
        else:
            logging.warning("SPICE skipped: it needs Java and the Stanford CoreNLP 3.6.0 jars in "
                            "pycocoevalcap/spice/lib (pycocoevalcap downloads them on first use; "
                            "copy them there by hand on an offline machine)")
    return out
