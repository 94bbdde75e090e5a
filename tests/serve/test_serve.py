"""`vidlora serve` through the official `openai` client: video, image, streaming, adapters, errors."""

from __future__ import annotations

import base64
import json
import threading
import urllib.request

import openai
import pytest

from lora_checkpoints import perturbed_lora_model, save_adapter
from serving import serving_app, serving_command
from vidlora.data.records import Turn
from vidlora.data.synthetic import generate_dataset
from vidlora.infer.adapters import ModelSet
from vidlora.infer.chat import chat_loop
from vidlora.infer.generate import Generator, Request, Sampling
from vidlora.infer.load import load_for_inference
from vidlora.infer.predict import PredictOptions, predict
from vidlora.jsonl import read_jsonl
from vidlora.serve.app import ServeSettings, create_app
from vidlora.serve.media import MediaPolicy

QUESTION = "What moves in the video?"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return save_adapter(*perturbed_lora_model(seed=1), root / "a"), save_adapter(
        *perturbed_lora_model(seed=2), root / "b"
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    out = tmp_path_factory.mktemp("media")
    generate_dataset(out, 4, 6, seed=11)
    return out


@pytest.fixture(scope="module")
def models(checkpoints):
    a, b = checkpoints
    return ModelSet.load(str(a), adapters={"b": str(b)}, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def server(models, media):
    app = create_app(models, ServeSettings(media=MediaPolicy(allowed_dir=media)))
    with serving_app(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _video(media):
    return sorted((media / "videos").glob("*.mp4"))[0]


def _data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _video_message(url, text=QUESTION):
    return [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def _ask(client, messages, **kwargs):
    kwargs = {"model": "a", "temperature": 0, "max_tokens": 10, **kwargs}
    return client.chat.completions.create(messages=messages, **kwargs)


def test_models_lists_the_base_and_each_adapter(client):
    listed = {m.id: m for m in client.models.list()}
    assert list(listed) == ["a", "base", "b"]
    assert client.models.retrieve("b").id == "b"
    assert json.loads(listed["b"].model_dump_json())["parent"] == "base"


def test_a_video_answer_equals_chat_and_predict(client, checkpoints, media, tmp_path):
    video = _video(media)
    served = _ask(client, _video_message(_data_url(video, "video/mp4")))
    streamed = _ask(
        client, _video_message(f"file://{video}"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(streamed)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    answer = served.choices[0].message.content
    assert answer and "".join(pieces) == answer and len(pieces) > 2
    assert finish == [served.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == (
        served.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    )
    loaded = load_for_inference(str(checkpoints[0]))
    # `vidlora chat` with the same file and question.
    lines = iter([QUESTION, ""])
    said: list[str] = []
    chat_loop(
        Generator(loaded), video, [], lambda: next(lines), said.append, max_new_tokens=10, temperature=0.0
    )
    assert said == [answer + "\n"]
    # `vidlora predict` on a one-sample dataset asking the same.
    data = tmp_path / "one.json"
    data.write_text(json.dumps([{"id": "q", "video": str(video.relative_to(media)), "conversations": [
        {"from": "human", "value": f"<video>\n{QUESTION}"}, {"from": "gpt", "value": "-"}]}]))  # fmt: skip
    out = predict(
        PredictOptions(
            model_path=str(checkpoints[0]), data_path=[str(data)], video_folder=str(media),
            image_folder=str(media), out=str(tmp_path / "p.jsonl"), max_new_tokens=10,
        ), loaded=loaded, progress=False,
    )  # fmt: skip
    assert [row["prediction"] for _, row in read_jsonl(out)] == [answer]
    # Usage: the prompt's own tokens, the video's feature tokens among them.
    config = loaded.model.get_base_model().config
    ids = Generator(loaded).prepare(Request("q", [Turn("human", f"<video>\n{QUESTION}")], video))["input_ids"]
    assert served.usage.prompt_tokens == len(ids)
    assert int((ids == config.video_token_id).sum()) == config.video_seq_length
    assert served.usage.completion_tokens == 10


def test_adapters_are_switched_by_model(client, checkpoints, media):
    video = f"file://{_video(media)}"
    answers = {
        m: _ask(client, _video_message(video), model=m).choices[0].message.content for m in ("a", "b", "base")
    }
    assert len(set(answers.values())) == 3
    request = Request("q", [Turn("human", f"<video>\n{QUESTION}")], _video(media))
    alone = Generator(load_for_inference(str(checkpoints[1]))).complete(
        [request], Sampling(max_new_tokens=10)
    )
    assert answers["b"] == alone[0].text
    assert _ask(client, _video_message(video), model=None).choices[0].message.content == answers["a"]


def test_an_image_question_and_a_system_message(client, checkpoints, media):
    image = sorted((media / "images").glob("*.jpg"))[0]
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(image, "image/jpeg")}},
                {"type": "text", "text": "Which color?"},
            ],
        },
    ]
    answer = _ask(client, messages).choices[0].message.content
    request = Request(
        "q", [Turn("system", "Answer in one word."), Turn("human", "<image>\nWhich color?")], None, [image]
    )
    expected = Generator(load_for_inference(str(checkpoints[0]))).complete(
        [request], Sampling(max_new_tokens=10)
    )
    assert answer == expected[0].text


def test_seed_stop_and_max_tokens_are_honoured(client):
    messages = [{"role": "user", "content": "Tell me about the video."}]
    hot = {"temperature": 1.3, "top_p": 0.95, "max_tokens": 12}
    first = _ask(client, messages, seed=5, **hot).choices[0].message.content
    assert _ask(client, messages, seed=5, **hot).choices[0].message.content == first
    assert {_ask(client, messages, seed=s, **hot).choices[0].message.content for s in (6, 7, 8)} - {first}
    long = _ask(client, messages).choices[0].message.content
    stop = long[4:7]
    stopped = _ask(client, messages, stop=[stop])
    assert stopped.choices[0].message.content == long[: long.find(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    assert _ask(client, messages, max_tokens=3).usage.completion_tokens == 3


def _error(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


@pytest.mark.parametrize(
    ("messages", "kwargs", "status", "code"),
    [
        ([{"role": "user", "content": "hi"}], {"model": "nope"}, 404, "model_not_found"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            {},
            400,
            "unsupported_content",
        ),
        (_video_message("file:///etc/hostname"), {}, 403, "media_not_allowed"),
        (_video_message("../outside.mp4"), {}, 403, "media_not_allowed"),
        (_video_message("videos/missing.mp4"), {}, 404, "media_not_found"),
        (_video_message("data:video/mp4;base64,AAAAIGZ0eXBpc29t"), {}, 400, "invalid_media"),
        (_video_message("data:text/plain;base64,aGk="), {}, 400, None),
        (_video_message("http://127.0.0.1:9/x.mp4"), {}, 403, "media_not_allowed"),
        ([{"role": "user", "content": "hi"}], {"max_tokens": 10**6}, 400, "context_length_exceeded"),
        ([{"role": "user", "content": "hi"}], {"n": 2}, 400, "unsupported"),
        ([{"role": "user", "content": "<video>\nhi"}], {}, 400, None),
        ([{"role": "assistant", "content": "hi"}], {}, 400, None),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], {}, 400, None),
        ([{"role": "user", "content": "hi"}], {"temperature": 7}, 400, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, messages, kwargs, status, code):
    got_status, body = _error(lambda: _ask(client, messages, **kwargs))
    assert got_status == status
    assert set(body) >= {"message", "type", "param", "code"} and body["message"]
    if code is not None:
        assert body["code"] == code
    assert "vidlora-serve-" not in body["message"]  # no server-side scratch paths
    assert (
        _ask(client, [{"role": "user", "content": "still there?"}], max_tokens=2).choices[0].message.content
    )


def test_malformed_bodies_are_400_json(server):
    url = server[0] + "/v1/chat/completions"
    for body in (b"{not json", b'{"messages": "hi"}', b"[]"):
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request)
        assert caught.value.code == 400
        assert json.loads(caught.value.read())["error"]["type"] == "invalid_request_error"


def test_limits_on_request_and_media_size_and_video_length(models, media):
    video = _video(media)
    tight = ServeSettings(
        media=MediaPolicy(allowed_dir=media, max_bytes=video.stat().st_size - 1, max_video_seconds=60),
        max_request_bytes=2 * video.stat().st_size,
    )
    short = ServeSettings(media=MediaPolicy(allowed_dir=media, max_video_seconds=0.5))
    with serving_app(create_app(models, tight)) as url, serving_app(create_app(models, short)) as url2:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        assert (
            _error(lambda: _ask(client, _video_message(_data_url(video, "video/mp4"))))[1]["code"]
            == "media_too_large"
        )
        assert _error(lambda: _ask(client, _video_message(f"file://{video}")))[1]["code"] == "media_too_large"
        big = [{"role": "user", "content": "x" * (3 * video.stat().st_size)}]
        assert _error(lambda: _ask(client, big))[0] == 413
        client2 = openai.OpenAI(base_url=url2 + "/v1", api_key="-", max_retries=0)
        assert _error(lambda: _ask(client2, _video_message(f"file://{video}")))[1]["code"] == "media_too_long"


def test_local_files_are_off_without_an_allowed_folder(models, media):
    with serving_app(create_app(models, ServeSettings())) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        status, body = _error(lambda: _ask(client, _video_message(f"file://{_video(media)}")))
        assert status == 403 and "--allowed_media_dir" in body["message"]
        assert _ask(client, _video_message(_data_url(_video(media), "video/mp4"))).choices[0].message.content


def test_an_api_key_is_required_when_set(models):
    with serving_app(create_app(models, ServeSettings(api_key="s3cret"))) as url:
        for key in ("wrong", ""):
            client = openai.OpenAI(base_url=url + "/v1", api_key=key or "-", max_retries=0)
            status, body = _error(lambda c=client: _ask(c, [{"role": "user", "content": "hi"}]))
            assert status == 401 and body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert _ask(good, [{"role": "user", "content": "hi"}], max_tokens=2).choices[0].message.content
        with urllib.request.urlopen(url + "/health") as response:  # the health check needs no key
            assert json.loads(response.read())["status"] == "ok"


def test_concurrent_clients_are_batched_and_answered_as_alone(client, server, media):
    engine = server[1].state.engine
    questions = [f"Question {i}: what moves?" for i in range(8)]
    alone = {
        q: _ask(client, _video_message(f"file://{_video(media)}", q)).choices[0].message.content
        for q in questions
    }
    before = engine.batches
    answers: dict[str, str] = {}
    barrier = threading.Barrier(len(questions))

    def ask(question):
        barrier.wait()
        answers[question] = (
            _ask(client, _video_message(f"file://{_video(media)}", question)).choices[0].message.content
        )

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == alone
    assert engine.batches - before < len(questions)  # some requests shared a generate call


def test_the_command_serves_a_video_question_streamed_and_not(checkpoints, media, tmp_path):
    a, b = checkpoints
    args = [
        "--model_path",
        str(a),
        "--adapters",
        f"second={b}",
        "--allowed_media_dir",
        str(media),
        "--device",
        "cpu",
    ]
    with serving_command(args, log_path=tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list()] == ["a", "base", "second"]
        message = _video_message(f"file://{_video(media)}")
        plain = _ask(client, message, model="second").choices[0].message.content
        streamed = "".join(
            c.choices[0].delta.content or "" for c in _ask(client, message, model="second", stream=True)
        )
        assert plain and streamed == plain
        assert _ask(client, message, model="a").choices[0].message.content != plain
    assert "vidlora serve: a, base, second at http://127.0.0.1:" in (tmp_path / "serve.log").read_text()


def test_a_symlink_out_of_the_allowed_folder_is_refused(models, media, tmp_path):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(_video(media).read_bytes())
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link.mp4").symlink_to(outside)
    with serving_app(create_app(models, ServeSettings(media=MediaPolicy(allowed_dir=allowed)))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        for path in (
            "link.mp4",
            str(allowed / "link.mp4"),
            f"file://{allowed}/link.mp4",
            f"file://{outside}",
        ):
            status, body = _error(lambda p=path: _ask(client, _video_message(p)))
            assert (status, body["code"]) == (403, "media_not_allowed"), path
