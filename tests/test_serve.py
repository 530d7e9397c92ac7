"""The captioning server on the demo model, through Starlette's TestClient: every endpoint, every error, the
same caption as caption.py, batch-invariant results, and 503s rather than lost responses under overload."""

import base64
import io
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the server needs the [serve] extra")
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx (in the [serve] extra)")

from starlette.testclient import TestClient  # noqa: E402

from vision_rwkv import Captioner, SamplingConfig  # noqa: E402
from vision_rwkv.config import ServeConfig  # noqa: E402
from vision_rwkv.serve import BatchScheduler, QueueFull, SchedulerClosed, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("shapes_test_*.png"))
SHAPES_3 = REPO / "examples" / "shapes_test_3.png"


@pytest.fixture(scope="module")
def captioner():
    return Captioner.load(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner, ServeConfig(max_wait_ms=1))) as c:
        yield c


def png_bytes(path=SHAPES_3) -> bytes:
    return Path(path).read_bytes()


def post_files(client, *paths, **fields):
    files = [("image", (Path(p).name, png_bytes(p), "image/png")) for p in paths]
    return client.post("/v1/caption", files=files, data={k: str(v) for k, v in fields.items()})


def captions_of(response) -> list[list[str]]:
    return [[c["caption"] for c in r["captions"]] for r in response.json()["results"]]


# ---- the endpoints ------------------------------------------------------------------------------------------


def test_the_page_is_html_with_no_external_resources(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file"' in r.text and 'id="strategy"' in r.text and "v1/caption" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: it works offline


def test_healthz_and_model(client):
    assert client.get("/healthz").json()["status"] == "ok"
    m = client.get("/v1/model").json()
    assert m["name"] == "demo" and m["device"] == "cpu" and m["dtype"] == "fp32"
    assert m["decoder"]["n_layer"] == 4 and m["limits"]["max_batch"] == 32


def test_the_caption_equals_caption_py(client, captioner, capsys):
    from vision_rwkv.cli.caption import main as caption_main

    assert caption_main([str(SHAPES_3), "device=cpu", "num_workers=0"]) == 0
    printed = capsys.readouterr().out.strip()
    (expected,) = list(captioner.caption_paths([SHAPES_3], SamplingConfig(max_new_tokens=48)))
    assert printed == expected.caption

    r = post_files(client, SHAPES_3)
    assert r.status_code == 200, r.text
    body = r.json()
    (result,) = body["results"]
    assert result["name"] == "shapes_test_3.png"
    assert result["captions"][0]["caption"] == printed
    assert result["captions"][0]["score"] == pytest.approx(expected.score, abs=1e-4)
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "compute_ms", "total_ms", "batch_images"}
    assert body["sampling"] == {"strategy": "greedy", "max_new_tokens": 48, "num_return": 1}


def test_json_base64_gives_the_same_as_multipart(client):
    data = base64.b64encode(png_bytes()).decode()
    r = client.post("/v1/caption", json={"images": [data, {"name": "x.png", "data": "data:image/png;base64," + data}]})
    assert r.status_code == 200, r.text
    assert [x["name"] for x in r.json()["results"]] == ["image 0", "x.png"]
    assert captions_of(r)[0] == captions_of(r)[1] == captions_of(post_files(client, SHAPES_3))[0]


def test_several_images_in_one_request_come_back_in_order(client, captioner):
    r = post_files(client, *EXAMPLES)
    expected = [x.caption for x in captioner.caption_paths(EXAMPLES, SamplingConfig(max_new_tokens=48))]
    assert [c[0] for c in captions_of(r)] == expected


def test_beam_and_sampling_fields(client):
    r = post_files(client, SHAPES_3, strategy="beam", num_beams=3, num_return=2)
    assert r.status_code == 200, r.text
    (caps,) = r.json()["results"]
    scores = [c["score"] for c in caps["captions"]]
    assert len(scores) == 2 and r.json()["sampling"]["num_beams"] == 3
    fields = dict(strategy="sample", top_p=0.9, top_a=0.1, temperature=0.8, seed=7, num_return=3, max_new_tokens=20)
    a, b = post_files(client, SHAPES_3, **fields), post_files(client, SHAPES_3, **fields)
    assert a.status_code == 200, a.text
    assert captions_of(a) == captions_of(b) and len(captions_of(a)[0]) == 3  # seeded: reproducible


# ---- errors: JSON {"error": one line} -----------------------------------------------------------------------


def one_line_error(r, status):
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("fields, words", [
    ({"top_p": 0.5}, "no effect with strategy greedy"),
    ({"strategy": "nucleus"}, "expected one of"),
    ({"strategy": "beam", "num_beams": 0}, "num_beams must be >= 1"),
    ({"strategy": "beam", "num_beams": 2, "num_return": 3}, "at most num_beams"),
    ({"strategy": "sample", "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"strategy": "sample", "temperature": -1}, "temperature must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 1000}, "at most 128"),
    ({"num_beams": "many"}, "expected an integer"),
    ({"seed": 1.5}, "expected an integer"),
    ({"beams": 3}, "unknown field(s) beams"),
])
def test_bad_sampling_fields_are_400(client, fields, words):
    data = base64.b64encode(png_bytes()).decode()
    assert words in one_line_error(client.post("/v1/caption", json={"images": [data], **fields}), 400)


def test_a_file_that_is_not_an_image_is_400_one_line(client):
    r = client.post("/v1/caption", files=[("image", ("notes.png", b"hello, not a png", "image/png"))])
    assert one_line_error(r, 400) == "notes.png: not an image (or a format Pillow cannot read)"


@pytest.mark.parametrize("body, words", [
    ({"images": ["@@@not base64@@@"]}, "not valid base64"),
    ({"images": "abc"}, "must be a list"),
    ({"images": [1]}, "must be a base64 string"),
    ({"images": []}, "no images in the request"),
    ([1, 2], "must be an object"),
])
def test_bad_json_bodies_are_400(client, body, words):
    assert words in one_line_error(client.post("/v1/caption", json=body), 400)


def test_not_json_and_wrong_content_type(client):
    assert "not valid JSON" in one_line_error(
        client.post("/v1/caption", content=b"{oops", headers={"content-type": "application/json"}), 400)
    assert "expected multipart/form-data or application/json" in one_line_error(
        client.post("/v1/caption", content=b"x", headers={"content-type": "text/plain"}), 415)


def test_unknown_paths_and_methods_are_json(client):
    assert "no such path /v2" in one_line_error(client.get("/v2"), 404)
    assert "GET is not allowed" in one_line_error(client.get("/v1/caption"), 405)


def test_a_body_over_the_limit_and_an_image_over_the_pixel_limit_are_413(captioner):
    with TestClient(create_app(captioner, ServeConfig(max_body_bytes=1000))) as small:
        assert "the limit is 1,000" in one_line_error(post_files(small, SHAPES_3), 413)

        def chunks():  # no Content-Length: the limit holds while streaming
            yield b'{"images": ["' + b"A" * 800
            yield b"A" * 800 + b'"]}'

        r = small.post("/v1/caption", content=chunks(), headers={"content-type": "application/json"})
        assert "over the limit of 1,000 bytes" in one_line_error(r, 413)
    with TestClient(create_app(captioner, ServeConfig(max_pixels=32 * 32))) as few_pixels:
        assert "more than the limit of 1,024" in one_line_error(post_files(few_pixels, SHAPES_3), 413)
    with TestClient(create_app(captioner, ServeConfig(max_images=2))) as few_images:
        assert "at most 2" in one_line_error(post_files(few_images, *EXAMPLES[:3]), 413)


def test_nothing_a_client_sends_is_written_to_disk(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("the server tried to write an upload to disk")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)  # a 2.4 MB PNG
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
    assert buffer.tell() > 2_000_000
    r = client.post("/v1/caption", files=[("image", ("noise.png", buffer.getvalue(), "image/png"))])
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fields", [{}, {"strategy": "beam"}], ids=["continuous", "request-level"])
def test_a_failure_in_the_worker_is_a_json_500_and_the_server_goes_on(captioner, client, monkeypatch, fields):
    from vision_rwkv.serve import continuous

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(captioner, "caption_images", broken)
    monkeypatch.setattr(continuous.RunningBatch, "step", broken)
    assert "internal error while captioning (RuntimeError)" in one_line_error(post_files(client, SHAPES_3, **fields),
                                                                              500)
    monkeypatch.undo()
    assert post_files(client, SHAPES_3, **fields).status_code == 200


def test_cors_is_off_unless_configured(captioner, client):
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "http://a.example"}).headers
    cfg = ServeConfig(cors_origins=["http://a.example"])
    with TestClient(create_app(captioner, cfg)) as c:
        r = c.get("/healthz", headers={"Origin": "http://a.example"})
        assert r.headers["access-control-allow-origin"] == "http://a.example"


def test_it_binds_loopback_by_default():
    assert ServeConfig().host == "127.0.0.1"


# ---- batching ---------------------------------------------------------------------------------------------


def preprocessed(captioner, paths):
    import torch

    return torch.stack([captioner.model.encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=48),
    SamplingConfig(strategy="beam", num_beams=3, num_return_sequences=2, max_new_tokens=48),
    SamplingConfig(strategy="sample", top_p=0.9, seed=5, num_return_sequences=2, max_new_tokens=48),
], ids=["greedy", "beam", "seeded-sample"])
def test_results_are_batch_invariant(captioner, sampling):
    """A request gets the same captions alone as in a batch with others (the worker waits long enough here
    for all of them to share one batch)."""
    alone = BatchScheduler(captioner, max_wait_ms=0, continuous=False).start()  # request-level batches here
    expected = alone.submit(preprocessed(captioner, [SHAPES_3]), sampling).result()
    alone.close()
    assert expected.batch_images == 1

    together = BatchScheduler(captioner, max_batch=32, max_wait_ms=2000, continuous=False).start()
    others = [together.submit(preprocessed(captioner, EXAMPLES), sampling) for _ in range(2)]
    mine = together.submit(preprocessed(captioner, [SHAPES_3]), sampling)
    together.close()
    got = mine.result()
    if sampling.seed is None:
        assert got.batch_images == 2 * len(EXAMPLES) + 1  # it really shared the batch
    assert [c for c, _ in got.captions[0]] == [c for c, _ in expected.captions[0]]
    assert [s for _, s in got.captions[0]] == pytest.approx([s for _, s in expected.captions[0]], abs=1e-4)
    assert others[0].result().captions == others[1].result().captions
    if sampling.seed is None:  # seeded draws come from one generator per request, so they depend on its images
        i = EXAMPLES.index(SHAPES_3)
        assert [c for c, _ in others[0].result().captions[i]] == [c for c, _ in expected.captions[0]]


def test_requests_with_different_settings_share_a_batch_window_but_not_a_decode(captioner):
    scheduler = BatchScheduler(captioner, max_wait_ms=2000, max_batch=3, continuous=False).start()
    greedy = scheduler.submit(preprocessed(captioner, [SHAPES_3]), SamplingConfig(max_new_tokens=48))
    beam = scheduler.submit(preprocessed(captioner, [SHAPES_3]), SamplingConfig(strategy="beam", max_new_tokens=48))
    greedy2 = scheduler.submit(preprocessed(captioner, [SHAPES_3]), SamplingConfig(max_new_tokens=48))
    scheduler.close()
    assert greedy.result().batch_images == greedy2.result().batch_images == 2
    assert beam.result().batch_images == 1
    assert scheduler.batches_run == 2


def test_a_full_queue_refuses_at_once_and_close_drains_what_was_queued(captioner):
    scheduler = BatchScheduler(captioner, max_wait_ms=10_000, max_batch=64, max_queue=4).start()
    images = preprocessed(captioner, [SHAPES_3])
    accepted = [scheduler.submit(images, SamplingConfig(max_new_tokens=8)) for _ in range(4)]
    with pytest.raises(QueueFull, match="the queue is full"):
        scheduler.submit(images, SamplingConfig(max_new_tokens=8))
    scheduler.close()  # does not wait out max_wait_ms: closing starts the last batch at once
    assert all(f.done() and len(f.result().captions) == 1 for f in accepted)
    with pytest.raises(SchedulerClosed):
        scheduler.submit(images, SamplingConfig())


def test_overload_gives_503s_with_retry_after_and_loses_no_response(captioner):
    cfg = ServeConfig(max_queue=3, max_batch=3, max_wait_ms=50)
    n = 24
    with TestClient(create_app(captioner, cfg)) as c:
        health: list[int] = []
        stop = threading.Event()

        def poll_health():
            while not stop.is_set():
                health.append(c.get("/healthz").status_code)

        poller = threading.Thread(target=poll_health)
        poller.start()
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: post_files(c, SHAPES_3, max_new_tokens=16), range(n)))
        stop.set()
        poller.join()
    statuses = [r.status_code for r in responses]
    assert len(statuses) == n and set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
        else:
            assert r.json()["results"][0]["captions"][0]["caption"]
    assert health and set(health) == {200}


# ---- continuous batching: plain greedy rows join and leave the running decode step by step -------------------


def staggered_requests(captioner, scheduler, gap_s=0.03):
    """Eight requests of one to four images, greedy to 48 tokens, gap_s apart, so that most arrive while
    others decode: -> [(paths, future)] and each image's (caption, score) alone (Captioner's). The scheduler
    stays open."""
    import time

    sampling = SamplingConfig(max_new_tokens=48)
    reference = {p: captioner.caption_images(preprocessed(captioner, [p]), sampling)[0][0] for p in EXAMPLES}
    futures = []
    for i in range(8):
        paths = EXAMPLES[i % len(EXAMPLES):] or EXAMPLES
        futures.append((paths, scheduler.submit(preprocessed(captioner, paths), sampling)))
        time.sleep(gap_s)
    return futures, reference


def captioned_as_alone(futures, reference, abs_score=1e-4) -> list:
    """Each request's Captioned, once every image's caption and score is checked against its own alone."""
    results = []
    for paths, future in futures:
        got = future.result(timeout=60)
        for path, captions in zip(paths, got.captions):
            (text, score), = captions
            assert text == reference[path][0]
            assert score == pytest.approx(reference[path][1], abs=abs_score)
        results.append(got)
    return results


def test_rows_join_the_running_decode_and_get_what_they_get_alone(captioner):
    """Requests arrive while others decode (different max_new_tokens, so rows leave at different steps):
    every image's caption and score equal Captioner's, alone, and some requests really joined mid-decode."""
    scheduler = BatchScheduler(captioner, max_batch=32, max_wait_ms=0).start()
    futures, reference = staggered_requests(captioner, scheduler)
    cut = scheduler.submit(preprocessed(captioner, [SHAPES_3]), SamplingConfig(max_new_tokens=5))
    scheduler.close()
    got = captioned_as_alone(futures, reference)
    assert sum(r.batch_images > len(paths) for r, (paths, _) in zip(got, futures)) >= 1
    assert scheduler.batches_run == 0  # all of it went through the running decode
    stats = scheduler.stats  # what the worker reports of itself (bench/serve_load.py prints it per level)
    assert stats.joined_images == sum(len(paths) for paths, _ in futures) + 1 and 2 <= stats.joins <= 9
    assert stats.steps >= 5 and stats.steps < stats.row_steps <= 32 * stats.steps
    assert stats.joining_s > 0 and stats.stepping_s > 0 and stats.captioning_s == 0
    assert 0 < stats.launching_s + stats.placing_s <= stats.joining_s  # parts of it
    assert 0 < stats.reading_s + stats.answering_s <= stats.stepping_s and stats.answering_s > 0
    (text, _), = cut.result().captions[0]
    alone = captioner.caption_images(preprocessed(captioner, [SHAPES_3]), SamplingConfig(max_new_tokens=5))
    assert text == alone[0][0][0]


def test_sampling_rows_join_with_their_own_settings_and_generators(captioner):
    """Seeded sampling (two captions an image), greedy with a ban and min_new_tokens, and unseeded sampling
    decode together, joining at different steps: the seeded request's captions and scores are the ones it
    gets decoding alone, and the held-back greedy request's are Captioner's."""
    import time

    seeded = SamplingConfig(strategy="sample", top_p=0.9, temperature=1.2, seed=11, num_return_sequences=2,
                            max_new_tokens=24)
    held = SamplingConfig(min_new_tokens=12, banned_tokens=[1, 2], max_new_tokens=24)  # shapes_test_0 has 9
    images = preprocessed(captioner, EXAMPLES[:2])

    alone = BatchScheduler(captioner, max_wait_ms=0).start()
    expected = alone.submit(images, seeded).result()
    alone.close()

    crowd = BatchScheduler(captioner, max_batch=64, max_wait_ms=0).start()
    long = SamplingConfig(min_new_tokens=40, max_new_tokens=40)  # still decoding when the seeded rows end
    others = [crowd.submit(preprocessed(captioner, EXAMPLES), long)]
    time.sleep(0.05)
    others.append(crowd.submit(preprocessed(captioner, [SHAPES_3]),
                               SamplingConfig(strategy="sample", top_k=5, max_new_tokens=30)))
    mine = crowd.submit(images, seeded)
    greedy = crowd.submit(preprocessed(captioner, EXAMPLES[:1]), held)
    crowd.close()
    got = mine.result()
    assert got.batch_images > 2 * 2  # it shared the decode: more rows than its own two images x two draws
    assert [[c for c, _ in image] for image in got.captions] == [[c for c, _ in image] for image in expected.captions]
    for image, want in zip(got.captions, expected.captions):
        assert [s for _, s in image] == pytest.approx([s for _, s in want], abs=1e-4)
        assert len(image) == 2 and image[0][1] >= image[1][1]  # two draws an image, best first
    (text, score), = greedy.result().captions[0]
    (want_text, want_score), = captioner.caption_images(preprocessed(captioner, EXAMPLES[:1]), held)[0]
    assert text == want_text and score == pytest.approx(want_score, abs=1e-4)
    (plain, _), = captioner.caption_images(preprocessed(captioner, EXAMPLES[:1]), SamplingConfig(max_new_tokens=24))[0]
    assert text != plain  # min_new_tokens held the end back: the row's own settings were applied
    assert all(len(f.result().captions) for f in others)
    assert crowd.batches_run == 0  # none of it needed a request-level batch


def test_a_beam_request_runs_between_steps_of_the_running_decode(captioner):
    scheduler = BatchScheduler(captioner, max_wait_ms=0).start()
    greedy = scheduler.submit(preprocessed(captioner, EXAMPLES), SamplingConfig(max_new_tokens=48))
    beam_cfg = SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=48)
    beam = scheduler.submit(preprocessed(captioner, [SHAPES_3]), beam_cfg)
    scheduler.close()
    assert beam.result().captions == captioner.caption_images(preprocessed(captioner, [SHAPES_3]), beam_cfg)
    assert len(greedy.result().captions) == len(EXAMPLES)
    assert scheduler.stats.captioning_s > 0 and scheduler.stats.joined_images == len(EXAMPLES)


def test_a_bug_outside_the_guarded_calls_answers_its_requests_and_the_worker_goes_on(captioner, monkeypatch):
    import vision_rwkv.serve.scheduler as module

    scheduler = BatchScheduler(captioner, max_wait_ms=0).start()
    calls = {"n": 0}
    original = module._groups

    def broken_once(jobs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the worker")
        return original(jobs)

    monkeypatch.setattr(module, "_groups", broken_once)
    images = preprocessed(captioner, [SHAPES_3])
    first = scheduler.submit(images, SamplingConfig(max_new_tokens=8))
    with pytest.raises(RuntimeError, match="a bug in the worker"):
        first.result(timeout=60)
    second = scheduler.submit(images, SamplingConfig(max_new_tokens=8)).result(timeout=60)
    scheduler.close()
    assert len(second.captions) == 1 and scheduler.worker_errors == 1


class _BucketedStep:
    """GraphedStep's contract on the CPU: the state it returns is its own buffer for that batch size (a graph
    each), overwritten in place by the next call of that size, whoever makes it."""

    bucketed = True

    def __init__(self, lm):
        self.lm, self.buffers, self.calls = lm, {}, []  # calls: (who, batch, whether the state was copied in)

    def __call__(self, tokens, state, who="other"):
        B = tokens.shape[0]
        own = self.buffers.get(B)
        copied = own is None or state is not own
        if own is None:
            own = self.buffers[B] = state.clone()
        elif copied:
            own.copy_(state)
        logits, new = self.lm.step(tokens, own)
        own.copy_(new)
        self.calls.append((who, B, copied))
        return logits, own


def test_the_running_batch_steps_the_steppers_own_buffer_and_survives_a_beam_job_reusing_it(captioner, monkeypatch):
    """With graphs' contract (bucketed batches, the stepper's own state buffers): rows join, leave and a beam
    request runs whole through the same stepper between two steps; every caption and score is what it is
    alone, and steady steps copy no state into the stepper."""
    import time

    from vision_rwkv.lm import beam, generate
    from vision_rwkv.serve import continuous

    greedy = SamplingConfig(max_new_tokens=48)
    beam_cfg = SamplingConfig(strategy="beam", num_beams=3, max_new_tokens=48)
    reference = {p: captioner.caption_images(preprocessed(captioner, [p]), greedy)[0][0] for p in EXAMPLES}
    beam_want = captioner.caption_images(preprocessed(captioner, [SHAPES_3]), beam_cfg)
    step = _BucketedStep(captioner.model.decoder)
    for module in (generate, beam):
        monkeypatch.setattr(module, "rnn_stepper", lambda lm: step)
    running = lambda tokens, state: step(tokens, state, "running")  # noqa: E731
    running.bucketed = True
    monkeypatch.setattr(continuous, "rnn_stepper", lambda lm: running)
    scheduler = BatchScheduler(captioner, max_batch=32, max_wait_ms=0).start()
    futures = []
    for i in range(5):
        paths = EXAMPLES[i % len(EXAMPLES):] or EXAMPLES
        futures.append((paths, scheduler.submit(preprocessed(captioner, paths), greedy)))
        time.sleep(0.03)
    beamed = scheduler.submit(preprocessed(captioner, [SHAPES_3]), beam_cfg)
    scheduler.close()
    for paths, future in futures:
        for path, captions in zip(paths, future.result().captions):
            (text, score), = captions
            assert text == reference[path][0] and score == pytest.approx(reference[path][1], abs=1e-4)
    got = beamed.result().captions  # (this stepper is lm.step, the reference's the CPU engine: scores to 1e-4)
    assert [[c for c, _ in image] for image in got] == [[c for c, _ in image] for image in beam_want]
    assert [s for _, s in got[0]] == pytest.approx([s for _, s in beam_want[0]], abs=1e-4)
    # a running-batch step right after one of the same size, with the same rows (all but the few where rows
    # joined or left): its state is the stepper's buffer, not copied in
    steady = [b for a, b in zip(step.calls, step.calls[1:]) if a[:2] == b[:2] and a[0] == "running"]
    assert sum(not copied for _, _, copied in steady) > 10
    assert any(who == "other" for who, _, _ in step.calls)  # the beam request used the same stepper
    assert max(B for who, B, _ in step.calls if who == "running") >= 4  # requests decoded together
    assert all(B & (B - 1) == 0 for who, B, _ in step.calls if who == "running")  # padded to powers of two


def test_overlapped_joins_let_the_decode_step_on_and_place_rows_once_ready(captioner, monkeypatch):
    """Overlapped joins (CUDA's default), their streams left out: a join placed only once it reports ready
    (here at its third poll), the running rows stepping meanwhile, one join in flight at a time; every caption
    and score is what the image gets alone."""
    from vision_rwkv.serve import continuous

    monkeypatch.setattr(continuous, "_can_overlap", lambda device: True)
    monkeypatch.setattr(continuous, "join_stream", lambda device: None)  # the join computed at launch
    polls, in_flight = {}, []

    def ready(join):
        polls[id(join)] = polls.get(id(join), 0) + 1
        return polls[id(join)] >= 3

    launch = continuous.RunningBatch.launch

    def counted_launch(self, jobs):
        in_flight.append(self.joining)
        return launch(self, jobs)

    monkeypatch.setattr(continuous._Join, "ready", ready)
    monkeypatch.setattr(continuous.RunningBatch, "launch", counted_launch)
    scheduler = BatchScheduler(captioner, max_batch=32, max_wait_ms=0)
    assert scheduler._running.overlaps
    futures, reference = staggered_requests(captioner, scheduler.start())
    scheduler.close()
    got = captioned_as_alone(futures, reference)
    stats = scheduler.stats
    assert stats.joins == len(in_flight) >= 2 and set(in_flight) == {0}  # never two joins in flight
    assert stats.joined_images == sum(len(paths) for paths, _ in futures)
    assert stats.overlapped_steps >= 2  # rows stepped while a join was out
    assert max(polls.values()) >= 3  # ... and were placed once it reported ready, not before
    assert sum(r.batch_images > len(paths) for r, (paths, _) in zip(got, futures)) >= 1  # some joined mid-decode


def test_a_step_that_fails_while_a_join_is_in_flight_answers_the_joining_requests_too(captioner, monkeypatch):
    """The running batch is dropped when a step fails: its rows' requests and those of a join still in flight
    get the error (none left waiting forever), and the worker goes on captioning."""
    import time

    from vision_rwkv.serve import continuous

    monkeypatch.setattr(continuous, "_can_overlap", lambda device: True)
    monkeypatch.setattr(continuous, "join_stream", lambda device: None)
    monkeypatch.setattr(continuous._Join, "ready", lambda join: False)  # placed only when nothing decodes
    step = continuous.RunningBatch.step
    failed = []

    def failing_step(self):
        if self.joining and not failed:
            failed.append(True)
            raise RuntimeError("a bug in the step")
        return step(self)

    monkeypatch.setattr(continuous.RunningBatch, "step", failing_step)
    scheduler = BatchScheduler(captioner, max_batch=32, max_wait_ms=0).start()
    image = preprocessed(captioner, EXAMPLES[:1])
    decoding = scheduler.submit(image, SamplingConfig(max_new_tokens=48, min_new_tokens=48))  # 48 steps
    time.sleep(0.05)  # decoding by now: the next request's join is launched beside it
    joining = scheduler.submit(image, SamplingConfig(max_new_tokens=48))
    for future in (decoding, joining):
        with pytest.raises(RuntimeError, match="a bug in the step"):
            future.result(timeout=60)
    sampling = SamplingConfig(max_new_tokens=48)
    later = scheduler.submit(image, sampling).result(timeout=60)
    scheduler.close()
    assert failed and later.captions[0][0][0] == captioner.caption_images(image, sampling)[0][0][0]


def test_overlapped_joins_are_off_on_the_cpu_and_when_configured_off(captioner):
    assert not BatchScheduler(captioner)._running.overlaps  # a CPU captioner
    assert ServeConfig().overlap_joins is True
    assert BatchScheduler.from_config(captioner, ServeConfig(overlap_joins=False, max_batch=7)).max_batch == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("overlap", [True, False])
def test_joins_on_their_own_cuda_stream_give_every_image_its_caption_alone(overlap):
    """On CUDA with graphs and fp32 weights: requests joining mid-decode, their encode and prefill on the join
    stream (or not), get each image's caption alone; with overlap some steps ran while a join was out."""
    from vision_rwkv.serve.continuous import warm_up

    cuda = Captioner.load(device="cuda", dtype="fp32")
    warm_up(cuda, 32)
    scheduler = BatchScheduler(cuda, max_batch=32, max_wait_ms=0, overlap_joins=overlap)
    assert scheduler._running.overlaps == overlap
    # on the GPU a caption decodes in a few milliseconds: requests 1 ms apart, so that joins come while rows
    # decode (rows held past their stop token would decode longer, but in their low-margin text a tie can
    # flip between batch sizes' products: seen on the H200 in fp32)
    futures, reference = staggered_requests(cuda, scheduler.start(), gap_s=0.001)
    scheduler.close()
    captioned_as_alone(futures, reference, abs_score=1e-3)
    assert scheduler.worker_errors == 0
    assert (scheduler.stats.overlapped_steps > 0) == overlap


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launching_and_placing_an_overlapped_join_never_make_the_host_wait():
    """A launch that waited for the device would stall the worker until the join's encoder had run (a
    torch.tensor(..., device="cuda") does): launch() and place_next() make no host sync (torch's sync debug
    mode set to raise, so a failure points at the call that synced); nor does a step, whose one read of its
    tokens waits on an event recorded after their copy (pipelined: the step was launched before it)."""
    from vision_rwkv.serve.continuous import RunningBatch, warm_up, worker_stream
    from vision_rwkv.serve.scheduler import _Job

    def without_syncs(fn):
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    cuda = Captioner.load(device="cuda")
    warm_up(cuda, 8)
    with worker_stream(cuda.device):
        batch = RunningBatch(cuda, overlap=True)
        batch.admit([_Job(preprocessed(cuda, EXAMPLES[:2]), SamplingConfig(max_new_tokens=99))])
        batch.step()
        join = _Job(preprocessed(cuda, EXAMPLES[:3]), SamplingConfig())
        without_syncs(lambda: batch.launch([join]))
        assert batch.joining == 1
        while len(batch) and not batch.join_ready():  # plain greedy rows
            without_syncs(batch.step)
        decoding = len(batch)
        without_syncs(batch.place_next)
        assert len(batch) == decoding + 3 and batch.joining == 0


@pytest.mark.parametrize("pipelined", [False, True])
def test_the_running_batch_grows_reuses_freed_slots_and_shrinks_with_every_row_as_alone(captioner, pipelined):
    """Driven step by step: the slots' capacity doubles past its first size when rows join with none free,
    rows leaving mid-decode free their slots and a later row is written into one, and once few rows are left
    the buffers shrink; every caption and score is what its request gets alone (greedy: Captioner's; seeded
    sampling: its own rows decoding alone). Pipelined (each step launched before its tokens are read: CUDA's
    default), rows that end are stepped once more and the buffers move with the next logits: the same."""
    from concurrent.futures import Future
    from dataclasses import dataclass, field

    from vision_rwkv.serve.continuous import RunningBatch

    @dataclass(eq=False)
    class Job:
        images: object
        sampling: SamplingConfig
        future: Future = field(default_factory=Future)

        @property
        def size(self):
            return self.images.shape[0]

    def decode(batch, arrivals):
        """arrivals: step -> jobs admitted before it; -> captions by id(job), and the slots' jobs (None: free)
        before each step."""
        got, slots, n = {}, [], 0
        while arrivals or len(batch):
            if n in arrivals:
                batch.admit(arrivals.pop(n))
            if len(batch):
                slots.append([None if row is None else row.job for row in batch.slots])
                got.update({id(job): captions for job, captions, _, _ in batch.step()})
            n += 1
        return got, slots

    greedy = [SamplingConfig(max_new_tokens=t) for t in (2, 48, 6, 48, 3)]  # 2, 6, 3: cut before the stop token
    seeded = SamplingConfig(strategy="sample", top_p=0.9, seed=3, num_return_sequences=2, max_new_tokens=10)
    jobs = [Job(preprocessed(captioner, [p]), cfg) for p, cfg in zip(EXAMPLES + EXAMPLES, greedy)]
    pair = Job(preprocessed(captioner, EXAMPLES[:2]), seeded)
    late = jobs[4]
    got, slots = decode(RunningBatch(captioner, pipelined=pipelined), {0: jobs[:2], 4: jobs[2:4] + [pair], 11: [late]})

    capacities = [len(s) for s in slots]
    assert capacities[0] == 2 and max(capacities) == 8  # doubled twice when five rows came with one slot free
    assert capacities[-1] == 2  # shrank once one row was left
    joined = next(n for n, s in enumerate(slots) if late in s)
    slot = slots[joined].index(late)
    assert capacities[joined - 1] == capacities[joined]  # it joined with no growth, into a freed slot:
    assert slots[joined - 1][slot] is None and any(s[slot] not in (None, late) for s in slots[:joined])
    for job in jobs:
        want = captioner.caption_images(job.images, job.sampling)
        assert [[c for c, _ in image] for image in got[id(job)]] == [[c for c, _ in image] for image in want]
        assert [s for image in got[id(job)] for _, s in image] == \
            pytest.approx([s for image in want for _, s in image], abs=1e-4)
    alone, _ = decode(RunningBatch(captioner, pipelined=not pipelined), {0: [Job(pair.images, seeded)]})
    (want,) = alone.values()
    assert [[c for c, _ in image] for image in got[id(pair)]] == [[c for c, _ in image] for image in want]
    assert [s for image in got[id(pair)] for _, s in image] == pytest.approx([s for image in want for _, s in image],
                                                                           abs=1e-4)


def test_joins_padded_to_a_power_of_two_give_the_same_captions_and_warm_up_covers_every_padded_size(captioner,
                                                                                                  monkeypatch):
    """With CUDA graphs a join is padded to a power of two (a graph per size, each captured by warm_up), and
    one larger than join_chunk() runs in chunks of it: the padding rows are encoded, prefilled and dropped;
    the real rows decode as they do unpadded."""
    from vision_rwkv.serve import continuous

    model = captioner.model
    seen = []
    forward = model.encoder.forward
    monkeypatch.setattr(model.encoder, "forward", lambda images: seen.append(images.shape[0]) or forward(images))
    images = preprocessed(captioner, EXAMPLES[:3])
    sampling = SamplingConfig(max_new_tokens=12)

    def run():
        scheduler = BatchScheduler(captioner, max_batch=8, max_wait_ms=50).start()
        try:
            return scheduler.submit(images, sampling).result(timeout=60).captions
        finally:
            scheduler.close()

    def same_as(got, want):
        assert [[c for c, _ in image] for image in got] == [[c for c, _ in image] for image in want]
        assert [s for image in got for _, s in image] == pytest.approx([s for image in want for _, s in image],
                                                                       abs=1e-4)

    plain = run()
    assert seen == [3]
    monkeypatch.setattr(continuous, "pads_joins", lambda captioner: True)
    same_as(run(), plain)
    assert seen == [3, 4]
    seen.clear()
    continuous.warm_up(captioner, 6)
    assert seen == [1, 2, 4, 8]
    monkeypatch.setattr(continuous, "join_chunk", lambda captioner: 2)  # graphs of at most 2 images
    seen.clear()
    same_as(run(), plain)
    assert seen == [2, 1]  # 3 images: a chunk of 2, then 1
    seen.clear()
    continuous.warm_up(captioner, 6)
    assert seen == [1, 2]


def test_while_rows_decode_new_images_join_in_groups_or_after_max_wait(captioner, monkeypatch):
    """A join costs about the same for 1 image as for 16, and every decoding row waits for it: with 8 rows
    decoding, one queued image waits (up to max_wait) for a second, a quarter of 8; max_wait 0 joins at once."""
    from vision_rwkv.serve import continuous
    from vision_rwkv.serve import scheduler as scheduler_module

    assert scheduler_module.JOIN_FRACTION == 4
    image = preprocessed(captioner, EXAMPLES[:1])
    for wait_ms, joins_alone in ((60_000, False), (0, True)):
        scheduler = BatchScheduler(captioner, max_batch=32, max_wait_ms=wait_ms)  # not started: driven here
        monkeypatch.setattr(continuous.RunningBatch, "__len__", lambda self: 8)
        first = scheduler.submit(image, SamplingConfig())
        taken = scheduler._take_batch(block=False)
        assert (len(taken) == 1) if joins_alone else taken == []
        if not joins_alone:
            scheduler.submit(image, SamplingConfig())
            assert len(scheduler._take_batch(block=False)) == 2 and scheduler.queued_images == 0
        first.cancel()


# ---- multipart parsing ----------------------------------------------------------------------------------


def form(parts, boundary="XyZ-123", preamble=b"", epilogue=b"", padding=b"") -> bytes:
    out = [preamble + (b"\r\n" if preamble else b"")]
    for headers, data in parts:
        out.append(b"--" + boundary.encode() + padding + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
                   + data + b"\r\n")
    return b"".join(out) + b"--" + boundary.encode() + b"--" + epilogue


PNG = png_bytes()
FORMS = {
    "the load test's": form([([b'Content-Disposition: form-data; name="max_new_tokens"'], b"20"),
                             ([b'Content-Disposition: form-data; name="image"; filename="a.png"',
                               b"Content-Type: image/png"], PNG)]),
    "a browser's, two files and fields": form([
        ([b'Content-Disposition: form-data; name="strategy"'], b"beam"),
        ([b'Content-Disposition: form-data; name="image"; filename="my photo; 1.png"', b"Content-Type: image/png"],
         PNG),
        ([b'Content-Disposition: form-data; name="num_beams"'], b"3"),
        ([b'Content-Disposition: form-data; name="image"; filename="b\\"q\\".png"'], PNG[:100]),
        ([b'Content-Disposition: form-data; name="empty"'], b""),
        ([b'Content-Disposition: form-data; name="image"; filename="empty.png"'], b""),
    ], boundary="----WebKitFormBoundary7MA4YWxkTrZu0gW"),
    "a preamble, an epilogue and padding": form([([b'content-disposition: form-data; name="image"; filename="x"'],
                                                   b"\r\n--not the boundary\r\n" + PNG)],
                                                preamble=b"ignore me", epilogue=b"\r\nand me", padding=b"  "),
    "base64 content": form([([b'Content-Disposition: form-data; name="image"; filename="x.png"',
                              b"Content-Transfer-Encoding: base64"], __import__("base64").b64encode(PNG))]),
}


@pytest.mark.parametrize("name", FORMS)
def test_multipart_bodies_parse_as_the_email_parser_parses_them(name):
    """The reference: the standard library's email parser, as the app parsed form data before (kept in
    bench/serve_parse.py, which times the two)."""
    sys.path.insert(0, str(REPO / "bench"))
    from serve_parse import email_parse

    from vision_rwkv.serve.app import _parse_multipart

    body = FORMS[name]
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW" if "browser" in name else "XyZ-123"
    for content_type in (f"multipart/form-data; boundary={boundary}",
                         f'multipart/form-data; charset=utf-8; boundary="{boundary}"'):
        got = _parse_multipart(content_type, body)
        assert got == email_parse(content_type, body)
        assert got[0] and all(isinstance(data, bytes) for _, data in got[0])


def test_multipart_filenames_in_utf8_and_rfc5987_and_malformed_bodies():
    from vision_rwkv.serve.app import RequestError, _parse_multipart

    ct = "multipart/form-data; boundary=B"
    body = form([(['Content-Disposition: form-data; name="image"; filename="café.png"'.encode()], PNG),
                 ([b"Content-Disposition: form-data; name=\"image\"; filename*=utf-8''%E2%9C%93.png"], PNG)], "B")
    assert [n for n, _ in _parse_multipart(ct, body)[0]] == ["café.png", "✓.png"]
    malformed = {"no boundary": ("multipart/form-data", body),
                 "no closing delimiter": (ct, body[:-6]),
                 "junk after a delimiter": (ct, body.replace(b"--B\r\n", b"--Bjunk\r\n", 1)),
                 "no blank line after the headers": (ct, b"--B\r\nContent-Disposition: form-data\r\n--B--")}
    for case, (content_type, data) in malformed.items():
        with pytest.raises(RequestError, match="malformed multipart body"):
            _parse_multipart(content_type, data)
            pytest.fail(case)


def test_an_uploaded_jpeg_is_decoded_as_caption_py_decodes_the_file(captioner, tmp_path):
    """Both decode a JPEG at the encoder's size (PIL's draft mode): the same pixels, so the same captions."""
    import torch

    from vision_rwkv.serve.app import ModelCard, preprocess

    path = tmp_path / "big.jpg"
    Image.open(SHAPES_3).convert("RGB").resize((640, 480), Image.BICUBIC).save(path, quality=90)
    served = preprocess(ModelCard.of(captioner, "demo"), [(path.name, path.read_bytes())], 10**8)
    assert torch.equal(served[0], captioner.image_files([str(path)])[0][1])


@pytest.mark.parametrize("prefix, prompt, chunk", [(197, 0, 16), (197, 5, 16), (600, 0, 4), (4096, 1, 1), (9000, 0, 1)])
def test_a_join_chunk_is_a_power_of_two_that_both_graphs_take(prefix, prompt, chunk):
    from types import SimpleNamespace

    from vision_rwkv.lm.graphs import MAX_ENCODER_GRAPH_BATCH, MAX_PREFILL_TOKENS
    from vision_rwkv.serve import continuous

    model = SimpleNamespace(prefix_len=prefix, prompt_ids=[0] * prompt)
    got = continuous.join_chunk(SimpleNamespace(model=model))
    assert got == chunk and got <= MAX_ENCODER_GRAPH_BATCH
    assert got == 1 or got * (prefix + prompt) <= MAX_PREFILL_TOKENS
    sizes = (1, 3, 16, 17, 22, 40, 45, 128)
    assert [continuous._padded(n, 16) for n in sizes] == [1, 4, 16, 17, 24, 40, 48, 128]
    for n in sizes:  # what prefill_images runs: pieces of a power of two up to the chunk (graphs warm_up made)
        padded = continuous._padded(n, 16)
        pieces = [len(piece) for piece in torch.arange(padded).split(16)]
        assert padded >= n and all(k & (k - 1) == 0 and k <= 16 for k in pieces)


@pytest.mark.parametrize("threads", [1, 3])
def test_uploads_are_decoded_by_at_most_intake_threads_at_once(captioner, monkeypatch, threads):
    """The intake (parsing, decoding, preprocessing) runs in a few threads, not the thread pool's 40: each one
    holds the GIL that the model's worker thread needs. Eight requests at once never decode more at a time."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from vision_rwkv.serve import app as app_module

    running, most, lock = [0], [0], threading.Lock()
    real = app_module.preprocess

    def slow(*args):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return real(*args)

    monkeypatch.setattr(app_module, "preprocess", slow)
    with TestClient(create_app(captioner, ServeConfig(max_wait_ms=1, intake_threads=threads))) as c:
        assert c.get("/v1/model").json()["limits"]["intake_threads"] == threads
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: post_files(c, SHAPES_3, max_new_tokens=2).status_code, range(8)))
    assert codes == [200] * 8 and most[0] == threads


def test_intake_threads_below_one_is_refused():
    from vision_rwkv.errors import VisionRWKVError

    with pytest.raises(VisionRWKVError, match="intake_threads is 0; expected >= 1"):
        ServeConfig(intake_threads=0).validate()
