"""vision_rwkv.train.metrics against small independent implementations of BLEU, ROUGE-L and CIDEr-D.

The references below follow the definitions pycocoevalcap uses (the COCO caption evaluation), written
from scratch: corpus BLEU with the closest reference length and its 1e-15 / 1e-9 smoothing, ROUGE-L
as an LCS F-measure with beta 1.2, and CIDEr-D with tf-idf n-grams, clipping and a Gaussian length penalty.
Java starts slowly (METEOR loads its paraphrase table for about 6 s), so each Java run is shared.
"""

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from vision_rwkv.errors import VisionRWKVError
from vision_rwkv.train import metrics
from vision_rwkv.train.metrics import coco_scores, simple_tokenize

FIXTURE = Path(__file__).parent / "fixtures" / "coco_tiny"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")


def load_fixture() -> tuple[dict, dict]:
    """References of the test split and the hand-written candidates, keyed by COCO id."""
    data = json.loads((FIXTURE / "dataset_coco.json").read_text())
    gts = {im["cocoid"]: [s["raw"] for s in im["sentences"]] for im in data["images"] if im["split"] == "test"}
    results = json.loads((FIXTURE / "results_test.json").read_text())
    return gts, {r["image_id"]: [r["caption"]] for r in results}


# ---- independent references ----------------------------------------------------------------------


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def reference_bleu(refs: dict, cands: dict, max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n: clipped n-gram counts and lengths summed over images, then one brevity penalty."""
    matched, possible = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for k, cand in cands.items():
        hyp, rs = cand.split(), [r.split() for r in refs[k]]
        cand_len += len(hyp)
        ref_len += min(rs, key=lambda r: (abs(len(r) - len(hyp)), len(r))).__len__()  # closest; ties: shorter
        for n in range(1, max_n + 1):
            most = Counter()
            for r in rs:
                most |= ngrams(r, n)  # | keeps the larger count: the most any single reference allows
            matched[n - 1] += sum(min(c, most[g]) for g, c in ngrams(hyp, n).items())
            possible[n - 1] += max(len(hyp) - n + 1, 0)
    brevity = 1.0 if cand_len >= ref_len else math.exp(1 - ref_len / cand_len)
    scores, log_sum = [], 0.0
    for n in range(1, max_n + 1):
        log_sum += math.log((matched[n - 1] + 1e-15) / (possible[n - 1] + 1e-9))
        scores.append(math.exp(log_sum / n) * brevity)
    return scores


def lcs_length(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def reference_rouge_l(refs: dict, cands: dict, beta: float = 1.2) -> float:
    """Mean over images of F_beta, from the best precision and the best recall over the references."""
    total = 0.0
    for k, cand in cands.items():
        hyp = cand.split()
        lcs = [lcs_length(r.split(), hyp) for r in refs[k]]
        precision = max(l / len(hyp) for l in lcs)
        recall = max(l / len(r.split()) for l, r in zip(lcs, refs[k]))
        if precision and recall:
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return total / len(cands)


def reference_cider_d(refs: dict, cands: dict, sigma: float = 6.0) -> float:
    """10 x mean over n=1..4 and over references of clipped tf-idf cosines, times exp(-delta^2 / 2 sigma^2).

    Document frequency: the number of scored images whose references contain the n-gram.
    pycocoevalcap measures delta in bigram counts, equal to the word-count difference for non-empty captions.
    """
    df = Counter()
    for k in cands:
        df.update({g for r in refs[k] for n in range(1, 5) for g in ngrams(r.split(), n)})
    log_images = math.log(len(cands))

    def tfidf(words, n):
        return {g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in ngrams(words, n).items()}

    def norm(vec):
        return math.sqrt(sum(v * v for v in vec.values()))

    per_image = []
    for k, cand in cands.items():
        hyp = cand.split()
        total = 0.0
        for r in refs[k]:
            ref = r.split()
            penalty = math.exp(-((len(hyp) - len(ref)) ** 2) / (2 * sigma**2))
            for n in range(1, 5):
                vh, vr = tfidf(hyp, n), tfidf(ref, n)
                dot = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vh.items())
                if norm(vh) and norm(vr):
                    total += dot / (norm(vh) * norm(vr)) * penalty
        per_image.append(10.0 * total / 4 / len(refs[k]))
    return sum(per_image) / len(per_image)


def tokenized(gts: dict, res: dict, tokenize=simple_tokenize) -> tuple[dict, dict]:
    return ({k: [tokenize(c) for c in v] for k, v in gts.items()}, {k: tokenize(v[0]) for k, v in res.items()})


def expected_ptb(text: str) -> str:
    """What the Stanford PTB tokenizer (with pycocoevalcap's punctuation removal) makes of the fixture."""
    return simple_tokenize(text).replace("chef s ", "chef 's ").replace("cloud wreathed", "cloud-wreathed")


# ---- shared runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simple_run():
    gts, res = load_fixture()
    return coco_scores(gts, res, tokenize="simple")


@pytest.fixture(scope="module")
def ptb_perfect_run():
    """PTB tokenization, each candidate the raw text of one of its references (capitals, "chef's", hyphens)."""
    gts, _ = load_fixture()
    perfect = {k: [refs[-1] if k == 522418 else refs[0]] for k, refs in gts.items()}
    return gts, perfect, coco_scores(gts, perfect, tokenize="ptb", spice=False)


# ---- tests ---------------------------------------------------------------------------------------


def test_simple_tokenize():
    assert simple_tokenize("A Dog's  ball,\non the GRASS. ") == "a dog s ball on the grass"
    assert simple_tokenize("black-and-white photo!!") == "black and white photo"
    assert simple_tokenize("under_score ... ") == "under score"
    assert simple_tokenize("Café, naïve") == "café naïve"


def test_fixture_exercises_the_edge_cases():
    """The comparison below means something only if the candidates hit the tricky paths."""
    gts, res = load_fixture()
    refs, cands = tokenized(gts, res)
    assert len(cands) == 4 and all(2 <= len(v) <= 5 for v in refs.values())
    hyp = cands[318219].split()
    assert not any(ngrams(hyp, 2) & ngrams(r.split(), 2) for r in refs[318219])  # a wrong caption
    hyp_len = {k: len(c.split()) for k, c in cands.items()}
    diffs = [[len(r.split()) - hyp_len[k] for r in refs[k]] for k in cands]
    assert any(-d in ds for ds in diffs for d in ds if d > 0)  # a closest-length tie: the shorter one counts
    assert sum(hyp_len.values()) < sum(min(len(r.split()) for r in refs[k]) for k in cands)  # brevity penalty


def test_scores_match_independent_implementation(simple_run):
    gts, res = load_fixture()
    refs, cands = tokenized(gts, res)
    bleu = reference_bleu(refs, cands)
    for n in range(4):
        assert simple_run[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-6)
    assert simple_run["ROUGE_L"] == pytest.approx(reference_rouge_l(refs, cands), abs=1e-6)
    assert simple_run["CIDEr"] == pytest.approx(reference_cider_d(refs, cands), abs=1e-6)
    assert 0.05 < simple_run["Bleu_4"] < simple_run["Bleu_1"] < 1  # not a degenerate corpus
    assert simple_run["CIDEr"] > 0.5


def test_cider_alone_matches(simple_run):
    gts, res = load_fixture()
    assert metrics.cider(gts, res) == pytest.approx(simple_run["CIDEr"], abs=1e-12)
    plain = {k: v[0] for k, v in res.items()}  # a bare string per image is accepted too
    assert metrics.cider(gts, plain) == pytest.approx(simple_run["CIDEr"], abs=1e-12)
    # one image: every n-gram occurs in all (one) images, so idf, and the score, are 0
    assert metrics.cider({1: ["a cat"]}, {1: ["a cat"]}) == 0.0


def test_cider_only_scores_the_ids_in_results():
    gts, res = load_fixture()
    three = {k: v for k, v in list(res.items())[:3]}
    refs, cands = tokenized({k: gts[k] for k in three}, three)
    assert metrics.cider(gts, three) == pytest.approx(reference_cider_d(refs, cands), abs=1e-6)


@needs_java
def test_meteor_runs_and_spice_is_skipped_without_its_jars(simple_run, ptb_perfect_run):
    assert 0 < simple_run["METEOR"] < 1
    _, _, perfect = ptb_perfect_run
    assert perfect["METEOR"] > 0.9 > simple_run["METEOR"]  # the fixture holds a wrong caption
    if metrics.spice_missing_jars():
        assert "SPICE" not in simple_run
        assert simple_run["skipped"]["SPICE"].startswith("SPICE jars not found (")
        assert set(simple_run["skipped"]) == {"SPICE"}
    else:
        assert 0 <= simple_run["SPICE"] <= 1


@needs_java
def test_ptb_tokenization(ptb_perfect_run):
    gts, perfect, scores = ptb_perfect_run
    assert scores["skipped"] == {"SPICE": "turned off (spice=False)"}
    # each candidate is one of its own references: BLEU and ROUGE-L are 1 if both sides were paired right
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    # CIDEr depends on every reference: it matches PTB's tokens ("chef 's", "cloud-wreathed"), not simple's
    refs, cands = tokenized(gts, perfect, expected_ptb)
    assert scores["CIDEr"] == pytest.approx(reference_cider_d(refs, cands), abs=1e-6)
    refs, cands = tokenized(gts, perfect)
    assert abs(scores["CIDEr"] - reference_cider_d(refs, cands)) > 1e-3


def test_without_java_falls_back_and_reports(monkeypatch, simple_run):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    gts, res = load_fixture()
    scores = coco_scores(gts, res, tokenize="ptb")
    assert scores["skipped"]["METEOR"].startswith("java not found on PATH")
    assert "fell back to simple tokenization" in scores["skipped"]["PTBTokenizer"]
    assert "METEOR" not in scores
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert scores[name] == pytest.approx(simple_run[name], abs=1e-12)


def test_bleu_smoothing_when_no_ngram_matches(monkeypatch):
    """With no 3- or 4-gram match in the whole corpus, pycocoevalcap's 1e-15 keeps BLEU-3/4 tiny but not 0."""
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # no Java needed here: skip METEOR quickly
    gts = {1: ["a cat sits on a mat", "the cat is on the mat"], 2: ["two dogs run in a park"]}
    res = {1: ["a cat on the sofa"], 2: ["dogs run fast"]}
    scores = coco_scores(gts, res, tokenize="simple")
    refs, cands = tokenized(gts, res)
    expected = reference_bleu(refs, cands)
    assert 0 < expected[3] < 1e-3
    for n in range(4):
        assert scores[f"Bleu_{n + 1}"] == pytest.approx(expected[n], abs=1e-9)


def one_line_error(call, match: str) -> str:
    with pytest.raises(VisionRWKVError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_bad_inputs_are_one_line_errors():
    gts, res = load_fixture()
    message = one_line_error(lambda: coco_scores(gts, {**res, 999: ["a cat"]}, tokenize="simple"),
                             "not in the references")
    assert "999" in message
    one_line_error(lambda: metrics.cider(gts, {}), "no results to score")
    one_line_error(lambda: coco_scores(gts, {391895: [None]}), "is a NoneType; expected a string")
    one_line_error(lambda: metrics.cider(gts, {391895: 7}), "is a int; expected a string")
    one_line_error(lambda: metrics.cider(gts, {391895: ["a", "b"]}), "hold 2 captions; expected exactly one")
    one_line_error(lambda: metrics.cider({1: []}, {1: "a cat"}), "non-empty list of strings")
    one_line_error(lambda: metrics.cider({1: ["ok", 3]}, {1: "a cat"}), "a reference of image 1 is a int")
    one_line_error(lambda: coco_scores(gts, res, tokenize="nltk"), "expected one of ptb, simple")


def test_required_spice_fails_before_any_work(monkeypatch):
    if not metrics.spice_missing_jars():
        pytest.skip("the SPICE jars are installed here")

    def never(*args):
        raise AssertionError("no scorer may run when a required SPICE cannot")

    monkeypatch.setattr(metrics, "_bleu", never)
    gts, res = load_fixture()
    one_line_error(lambda: coco_scores(gts, res, tokenize="simple", spice=True), "SPICE was required")


@needs_java
def test_stuck_meteor_is_killed_and_skipped(monkeypatch):
    """The Java process is killed after the timeout; the failed wrapper must not hang when it is collected."""
    monkeypatch.setattr(metrics, "JAVA_TIMEOUT_S", 0.2)  # METEOR needs seconds just to load its tables
    gts, res = load_fixture()
    scores = coco_scores(gts, res, tokenize="simple", spice=False)
    assert scores["skipped"]["METEOR"].startswith("RuntimeError: METEOR gave no answer within")
    assert "METEOR" not in scores and "CIDEr" in scores
