"""The one generation path: streamed pieces add up to the answer, per-row stops and budgets, usage."""

from __future__ import annotations

import pytest
import torch

from lora_checkpoints import perturbed_lora_model, save_adapter
from vidlora.data.records import Turn
from vidlora.data.synthetic import generate_dataset
from vidlora.infer.generate import Generator, Request, Sampling, _held_back, cut_at_stops
from vidlora.infer.load import load_for_inference


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    model, tokenizer = perturbed_lora_model()
    return Generator(load_for_inference(str(save_adapter(model, tokenizer, tmp_path_factory.mktemp("ck")))))


@pytest.fixture(scope="module")
def requests_(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 4, 4, seed=3)
    video = sorted(out.rglob("*.mp4"))[0]
    image = sorted(out.rglob("*.png"))[0]
    return [
        Request("v", [Turn("human", "<video>\nWhat moves?")], video),
        Request("t", [Turn("human", "hello there")]),
        Request("i", [Turn("human", "<image>\nWhich color?")], None, [image]),
    ]


def _stream(generator, requests, sampling):
    pieces: dict[int, list[str]] = {}
    completions = generator.complete(
        requests, sampling, on_text=lambda row, p: pieces.setdefault(row, []).append(p)
    )
    return completions, pieces


def test_streamed_pieces_add_up_to_each_answer(generator, requests_):
    completions, pieces = _stream(generator, requests_, Sampling(max_new_tokens=12))
    for row, completion in enumerate(completions):
        assert completion.text  # the perturbed adapter says something
        assert "".join(pieces[row]) == completion.text
        assert len(pieces[row]) > 1  # streamed, not sent at the end
        assert (completion.completion_tokens, completion.finish_reason) == (12, "length")


def test_usage_counts_media_tokens_as_prompt(generator, requests_):
    completions = generator.complete(requests_, Sampling(max_new_tokens=2))
    counts = generator.processor.counts
    for request, completion in zip(requests_, completions, strict=True):
        ids = generator.prepare(request)["input_ids"]
        assert completion.prompt_tokens == len(ids)
        config = generator.model.get_base_model().config
        assert int((ids == config.video_token_id).sum()) == (counts.video if request.video else 0)
        assert int((ids == config.image_token_id).sum()) == counts.image * len(request.images)


def test_a_stop_string_ends_its_own_row_only(generator, requests_):
    long = generator.complete(requests_, Sampling(max_new_tokens=12))
    word = long[0].text[3:6]
    stop = Sampling(max_new_tokens=12, stop=(word,))
    plain = Sampling(max_new_tokens=12)
    completions, pieces = _stream(generator, requests_, [stop, plain, plain])
    assert completions[0].text == long[0].text[: long[0].text.find(word)].strip()
    assert completions[0].finish_reason == "stop"
    assert completions[0].completion_tokens < 12
    assert "".join(pieces[0]) == completions[0].text
    assert [c.text for c in completions[1:]] == [c.text for c in long[1:]]


def test_each_row_keeps_its_own_budget_and_equals_its_run_alone(generator, requests_):
    budgets = [3, 9, 5]
    completions = generator.complete(requests_, [Sampling(max_new_tokens=n) for n in budgets])
    for request, budget, completion in zip(requests_, budgets, completions, strict=True):
        (alone,) = generator.complete([request], Sampling(max_new_tokens=budget))
        assert completion.text == alone.text
        assert completion.completion_tokens == budget


def test_a_seed_makes_sampling_repeatable(generator, requests_):
    hot = dict(max_new_tokens=10, temperature=1.5, top_p=0.9)
    first = generator.complete(requests_[1:2], Sampling(**hot, seed=7))[0].text
    again = generator.complete(requests_[1:2], Sampling(**hot, seed=7))[0].text
    others = {generator.complete(requests_[1:2], Sampling(**hot, seed=s))[0].text for s in range(8, 12)}
    assert first == again
    assert others - {first}


def test_rows_of_one_batch_must_share_the_sampler(generator, requests_):
    with pytest.raises(ValueError, match="share"):
        generator.complete(
            requests_[:2], [Sampling(temperature=1.0, seed=1), Sampling(temperature=1.0, seed=2)]
        )
    # Greedy rows batch together whatever their seed.
    generator.complete(
        requests_[:2], [Sampling(max_new_tokens=1, seed=1), Sampling(max_new_tokens=1, seed=2)]
    )


def test_stop_helpers():
    assert cut_at_stops("abc###def</s>", ["</s>", "###"]) == ("abc", True)
    assert cut_at_stops("abc", ["x", ""]) == ("abc", False)
    # "ab#" may be the start of "###": hold one character back; "ab" holds none.
    assert _held_back("ab#", ["###"]) == 1
    assert _held_back("ab##", ["###", "</s>"]) == 2
    assert _held_back("ab<", ["###", "</s>"]) == 1
    assert _held_back("ab", ["###"]) == 0


def test_generate_returns_the_completions_texts(generator, requests_):
    torch.manual_seed(0)
    assert generator.generate(requests_, max_new_tokens=6) == [
        c.text for c in generator.complete(requests_, Sampling(max_new_tokens=6))
    ]
