"""The Chat tab's pieces: the conversation as `vidlora chat` builds it, streamed answers equal to
the one generation path's, and the frames the model gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vidlora.data.media import read_video
from vidlora.data.records import Turn
from vidlora.errors import UsageError
from vidlora.infer.chat import first_message
from vidlora.webui.chat import Conversation, Settings, model_frames, stream_reply


@pytest.fixture(scope="module")
def models(webui_checkpoint):
    from vidlora.infer.adapters import ModelSet

    return ModelSet.load(str(webui_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def video(webui_synth) -> Path:
    return webui_synth / "videos" / "eval_00001.mp4"


def test_the_first_message_carries_the_media_and_follow_ups_do_not():
    video, images = Path("clip.mp4"), (Path("a.png"),)
    conversation = Conversation().ask("What is it?", video, images)
    assert conversation.turns == (Turn("human", "<video>\n<image>\nWhat is it?"),)
    assert conversation.turns[0].value == first_message("What is it?", video, list(images))
    later = conversation.answered("A ball.").ask("Which colour?", Path("other.mp4"))
    assert later.turns[1:] == (Turn("gpt", "A ball."), Turn("human", "Which colour?"))
    assert (later.video, later.images) == (video, images)  # fixed by the first message


def test_streamed_answer_is_the_generators_answer(models, video):
    from vidlora.infer.generate import Request, Sampling

    name = models.names[0]
    conversation = Conversation().ask("What moves?", video)
    replies = [
        (r.text, r.done) for r in stream_reply(models, name, conversation, Settings(max_new_tokens=10))
    ]
    *partial, (final, done) = replies
    assert done and len(partial) >= 2  # piece by piece, then the completion
    assert all(final.startswith(text) for text, _ in partial)
    with models.use(name) as generator:
        request = Request("ref", list(conversation.turns), video, [])
        expected = generator.complete([request], Sampling(max_new_tokens=10))[0]
    assert final == expected.text and partial[-1][0] == expected.text
    # A follow-up sees the first answer: its prompt is longer by both turns.
    follow = conversation.answered(final).ask("And then?")
    last = list(stream_reply(models, name, follow, Settings(max_new_tokens=4)))[-1]
    assert last.completion.prompt_tokens > expected.prompt_tokens + 2


def test_an_error_in_generation_reaches_the_caller(models):
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        list(stream_reply(models, "nope", Conversation().ask("hi"), Settings()))


def test_the_frames_shown_are_the_tower_input(models, video):
    frames = model_frames(models, models.names[0], video)
    decoded, _ = read_video(video, 8)  # 64 px clips, the tiny towers' size: no resize, no crop
    assert len(frames) == 8
    np.testing.assert_array_equal(np.stack(frames), decoded)
