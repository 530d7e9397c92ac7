"""Captioning metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE through pycocoevalcap.

    scores = coco_scores(gts, res)          # gts: {image_id: [reference, ...]}, res: {image_id: [caption]}
    scores["CIDEr"], scores["skipped"]      # skipped: {scorer: why it did not run}
    cider(gts, res)                         # CIDEr-D alone, pure Python: for validation during training

Every scorer is built and run on its own, so one that cannot run (METEOR and the PTB tokenizer need
Java, SPICE needs Stanford CoreNLP jars that pycocoevalcap would otherwise download) is reported in
`skipped` and the others still count. Only the images present in `res` are scored.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Optional

from ..errors import VisionRWKVError

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
TOKENIZERS = ("ptb", "simple")
# METEOR talks to a Java process line by line; a stuck process would otherwise hang the evaluation forever.
JAVA_TIMEOUT_S = 1800.0
SPICE_JARS = ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar")

_PUNCTUATION = re.compile(r"[^\w\s]|_")

Captions = Mapping[Hashable, Any]


def simple_tokenize(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, words joined by single spaces (a pure-Python PTB stand-in)."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def coco_scores(gts: Captions, res: Captions, *, tokenize: str = "ptb", spice: Optional[bool] = None) -> dict:
    """The COCO caption metrics of the captions in `res` against the references in `gts`.

    gts: {image_id: [reference caption, ...]}; res: {image_id: [caption]} (or {image_id: caption}), with
    every id of res in gts. tokenize: "ptb" (Stanford PTB tokenizer, Java: the published protocol) or
    "simple" (see simple_tokenize). spice: None runs SPICE when its jars are installed, False never,
    True requires it (a failure raises).

    Returns {"Bleu_1": float, ..., "CIDEr": float[, "SPICE": float], "skipped": {name: reason},
    "tokenize": the tokenization actually used ("simple" when the PTB tokenizer could not run)}.
    """
    if tokenize not in TOKENIZERS:
        raise VisionRWKVError(f"tokenize is {tokenize!r}; expected one of {', '.join(TOKENIZERS)}")
    refs, cands = _checked(gts, res)
    if spice:
        try:
            _spice_ready()
        except _Unavailable as e:
            raise VisionRWKVError(f"SPICE was required but cannot run: {e}") from None
    skipped: dict[str, str] = {}
    if tokenize == "ptb":
        try:
            refs, cands = _ptb_tokenize(refs, cands)
        except Exception as e:  # any failure of the Java tokenizer falls back, and says so
            skipped["PTBTokenizer"] = f"{_reason(e)}; fell back to simple tokenization (not the published protocol)"
            tokenize = "simple"
    if tokenize == "simple":
        refs = {k: [simple_tokenize(c) for c in v] for k, v in refs.items()}
        cands = {k: [simple_tokenize(v[0])] for k, v in cands.items()}

    scores: dict[str, Any] = {}
    for name, run in _scorers(spice):
        try:
            scores.update(run(refs, cands))
        except Exception as e:  # one scorer failing must not lose the others
            if name == "SPICE" and spice:
                raise VisionRWKVError(f"SPICE was required but failed: {_reason(e)}") from e
            skipped[name] = _reason(e)
    scores["skipped"] = skipped
    scores["tokenize"] = tokenize
    return scores


def cider(gts: Captions, res: Captions) -> float:
    """CIDEr-D (pycocoevalcap's Cider) with simple tokenization: no Java, fast enough to run during training.

    The idf weights come from the references of the scored images, so score a few hundred images;
    on a single image every n-gram has idf 0 and the score is 0.
    """
    from pycocoevalcap.cider.cider import Cider

    refs, cands = _checked(gts, res)
    refs = {k: [simple_tokenize(c) for c in v] for k, v in refs.items()}
    cands = {k: [simple_tokenize(v[0])] for k, v in cands.items()}
    score, _ = Cider().compute_score(refs, cands)
    return float(score)


# ---- input checks ------------------------------------------------------------------------------


def _checked(gts: Captions, res: Captions) -> tuple[dict, dict]:
    """Validated copies, restricted to the ids of res, with whitespace (newlines included) collapsed."""
    if not isinstance(gts, Mapping) or not isinstance(res, Mapping):
        raise VisionRWKVError(
            f"references and results must be mappings of image id to captions, got {type(gts).__name__} "
            f"and {type(res).__name__}"
        )
    if not res:
        raise VisionRWKVError("there are no results to score; expected at least one image with a caption")
    unknown = [k for k in res if k not in gts]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise VisionRWKVError(
            f"results name {len(unknown)} image id(s) that are not in the references: {shown}; "
            f"expected ids among the {len(gts)} reference images"
        )
    cands, refs = {}, {}
    for k, value in res.items():
        caption = value
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise VisionRWKVError(f"results for image {k!r} hold {len(value)} captions; expected exactly one")
            caption = value[0]
        if not isinstance(caption, str):
            raise VisionRWKVError(f"the caption of image {k!r} is a {type(caption).__name__}; expected a string")
        cands[k] = [" ".join(caption.split())]
        references = gts[k]
        if isinstance(references, str) or not isinstance(references, (list, tuple)) or not references:
            got = f"an empty {type(references).__name__}" if not references else f"a {type(references).__name__}"
            raise VisionRWKVError(f"the references of image {k!r} are {got}; expected a non-empty list of strings")
        for r in references:
            if not isinstance(r, str):
                raise VisionRWKVError(f"a reference of image {k!r} is a {type(r).__name__}; expected a string")
        refs[k] = [" ".join(r.split()) for r in references]
    return refs, cands


class _Unavailable(Exception):
    """A scorer that cannot run here; its message is the whole reason."""


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no message"
    return (text if isinstance(e, _Unavailable) else f"{type(e).__name__}: {text}")[:400]


def _need_java() -> None:
    if shutil.which("java") is None:
        raise _Unavailable("java not found on PATH (METEOR, SPICE and the PTB tokenizer need it)")


# ---- tokenization ------------------------------------------------------------------------------


def _ptb_tokenize(refs: dict, cands: dict) -> tuple[dict, dict]:
    """Both sides through one run of the Stanford PTB tokenizer (one JVM start), punctuation removed."""
    _need_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tagged = {("ref", k): [{"caption": c} for c in v] for k, v in refs.items()}
    tagged.update({("cand", k): [{"caption": v[0]}] for k, v in cands.items()})
    out = PTBTokenizer().tokenize(tagged)
    # The wrapper pairs output lines with inputs by position; a lost line would shift every later caption.
    if any(len(out.get(key, ())) != len(value) for key, value in tagged.items()):
        raise RuntimeError("the PTB tokenizer returned a different number of lines than it was given")
    return ({k: out[("ref", k)] for k in refs}, {k: out[("cand", k)] for k in cands})


# ---- scorers -----------------------------------------------------------------------------------


def _scorers(spice: Optional[bool]):
    yield "BLEU", _bleu
    yield "METEOR", _meteor
    yield "ROUGE_L", _rouge
    yield "CIDEr", _cider
    yield "SPICE", _spice if spice is not False else _spice_off


def _bleu(refs: dict, cands: dict) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu

    score, _ = Bleu(4).compute_score(refs, cands, verbose=0)
    return {f"Bleu_{n + 1}": float(s) for n, s in enumerate(score)}


def _rouge(refs: dict, cands: dict) -> dict[str, float]:
    from pycocoevalcap.rouge.rouge import Rouge

    score, _ = Rouge().compute_score(refs, cands)
    return {"ROUGE_L": float(score)}


def _cider(refs: dict, cands: dict) -> dict[str, float]:
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(refs, cands)
    return {"CIDEr": float(score)}


def _meteor(refs: dict, cands: dict) -> dict[str, float]:
    _need_java()
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    timer = threading.Timer(JAVA_TIMEOUT_S, scorer.meteor_p.kill)
    timer.daemon = True
    timer.start()
    try:
        score, _ = scorer.compute_score(refs, cands)
    except Exception as e:
        if timer.finished.is_set():
            raise RuntimeError(f"METEOR gave no answer within {JAVA_TIMEOUT_S:g} s") from e
        raise
    finally:
        timer.cancel()
        _close_meteor(scorer)
    return {"METEOR": float(score)}


def _close_meteor(scorer) -> None:
    # A failed compute_score leaves its lock held, and Meteor.__del__ takes that lock: it would wait forever.
    scorer.lock = threading.Lock()
    proc = scorer.meteor_p
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:  # closing flushes what the dead process never read: a broken pipe
            pass


def _spice_dir() -> Path:
    import pycocoevalcap.spice

    return Path(pycocoevalcap.spice.__file__).parent


def spice_missing_jars() -> list[str]:
    """The jars SPICE needs that are not installed (pycocoevalcap downloads CoreNLP on first use otherwise)."""
    return [str(_spice_dir() / name) for name in SPICE_JARS if not (_spice_dir() / name).is_file()]


def _spice_off(refs: dict, cands: dict) -> dict[str, float]:
    raise _Unavailable("turned off (spice=False)")


def _spice_ready() -> None:
    missing = [name for name in SPICE_JARS if not (_spice_dir() / name).is_file()]
    if missing:
        raise _Unavailable(
            f"SPICE jars not found ({', '.join(missing)} in {_spice_dir()}); fetch them once with network "
            "access: python -m pycocoevalcap.spice.get_stanford_models"
        )
    _need_java()


def _spice(refs: dict, cands: dict) -> dict[str, float]:
    _spice_ready()
    from pycocoevalcap.spice.spice import Spice

    score, _ = Spice().compute_score(refs, cands)
    return {"SPICE": float(score)}
