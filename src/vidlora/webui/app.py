"""The Gradio app of `vidlora webui`: Chat, Train and Data tabs over the pieces in this package.

Only this module imports Gradio. Each tab's work lives beside it, UI-free and tested on its own
(:mod:`~vidlora.webui.chat`, :mod:`~vidlora.webui.train_job`, :mod:`~vidlora.webui.data_view`);
here they are laid out and wired. A :class:`~vidlora.errors.VidloraError` raised by an action is
shown in the page as a Gradio error (the CLI's one error policy, in the browser).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vidlora.errors import VidloraError
from vidlora.webui.chat import Conversation, Settings, model_frames, stream_reply
from vidlora.webui.data_view import MEDIA, TRAINED, check_argv, run_data_check, sample_view
from vidlora.webui.train_job import (
    FormField,
    Jobs,
    flags_from_form,
    form_fields,
    form_from_flags,
    launch_words,
    plot_points,
    split_launch,
)

TITLE = "vidlora"


def _shown_errors(fn: Callable) -> Callable:
    """``fn`` with a user error turned into a Gradio error message (generator functions too)."""
    import gradio as gr

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any) -> Any:
            try:
                yield from fn(*args)
            except VidloraError as err:
                raise gr.Error(str(err)) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except VidloraError as err:
            raise gr.Error(str(err)) from None

    return call


def _field_component(field: FormField) -> Any:
    import gradio as gr

    common: dict[str, Any] = {
        "label": field.flag,
        "info": field.help or None,
        "elem_id": f"train-{field.name}",
        "min_width": 240,
    }
    if field.kind == "bool":
        return gr.Checkbox(value=bool(field.default), **common)
    if field.choices:
        return gr.Dropdown(
            choices=list(field.choices), value=None if field.default is None else str(field.default),
            allow_custom_value=True, **common,
        )  # fmt: skip
    if field.kind in ("int", "float"):
        return gr.Number(value=field.default, precision=0 if field.kind == "int" else None, **common)
    return gr.Textbox(value="" if field.default is None else str(field.default), **common)


def _chat_tab(models: Any) -> None:
    import gradio as gr

    if models is None:
        gr.Markdown("No model loaded: start with `vidlora webui --model_path CHECKPOINT` to chat.")
        return
    names = list(models.names)
    conversation = gr.State(Conversation())
    with gr.Row():
        with gr.Column(scale=2):
            video = gr.Video(label="video", sources=["upload"], elem_id="chat-video", height=220)
            images = gr.File(
                label="images", file_count="multiple", file_types=["image"], elem_id="chat-images"
            )
            adapter = gr.Dropdown(names, value=names[0], label="model", elem_id="chat-model")
            with gr.Accordion("sampling", open=False):
                max_new_tokens = gr.Slider(
                    1,
                    1024,
                    value=Settings.max_new_tokens,
                    step=1,
                    label="max new tokens",
                    elem_id="chat-max-new-tokens",
                )
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top p")
                seed = gr.Number(0, precision=0, label="seed")
        with gr.Column(scale=3):
            # Plain text: an answer is shown exactly as generated (no markdown rendering of model output).
            chatbot = gr.Chatbot(label="conversation", elem_id="chatbot", height=380, render_markdown=False)
            question = gr.Textbox(
                label="question", placeholder="Ask about the video…", elem_id="chat-question"
            )
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="chat-send")
                clear = gr.Button("Clear", elem_id="chat-clear")
            usage = gr.Markdown(elem_id="chat-usage")
    frames = gr.Gallery(
        label="the frames the model sees (sampled, cropped and sized as its tower gets them)", columns=8,
        height=170, elem_id="chat-frames", object_fit="contain", preview=False,
    )  # fmt: skip

    @_shown_errors
    def show_frames(path: str | None, name: str) -> list:
        return model_frames(models, name, path) if path else []

    @_shown_errors
    def respond(text, path, files, name, new_tokens, temp, p, seed_, history, conv: Conversation):
        text = (text or "").strip()
        if not text:
            yield history, conv, text, gr.update()
            return
        conv = conv.ask(text, Path(path) if path else None, tuple(Path(f) for f in files or ()))
        history = [*(history or []), {"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        settings = Settings(int(new_tokens), float(temp), float(p), int(seed_ or 0))
        for reply in stream_reply(models, name, conv, settings):
            history[-1] = {"role": "assistant", "content": reply.text}
            note: Any = gr.update()
            if reply.done:
                c = reply.completion
                conv = conv.answered(reply.text)
                note = f"{name}: {c.prompt_tokens} prompt tokens, {c.completion_tokens} generated ({c.finish_reason})"
            yield history, conv, "", note

    outputs = [chatbot, conversation, question, usage]
    inputs = [
        question,
        video,
        images,
        adapter,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        chatbot,
        conversation,
    ]
    send.click(respond, inputs, outputs)
    question.submit(respond, inputs, outputs)
    video.change(show_frames, [video, adapter], frames)
    clear.click(
        lambda: ([], Conversation(), None, None, [], ""),
        None,
        [chatbot, conversation, video, images, frames, usage],
    )


def _rows(fields: list[FormField]) -> tuple[list[FormField], list[FormField]]:
    """A form section's text fields, then its switches: a row of their own (beside text fields
    Gradio squeezes them)."""
    return [f for f in fields if f.kind != "bool"], [f for f in fields if f.kind == "bool"]


def _train_tab(jobs: Jobs, cuda_available: bool) -> Any:
    import gradio as gr

    sections = form_fields(cuda_available=cuda_available)
    # Component order: per section, its text fields, then its switches (as laid out below).
    fields = [f for section in sections.values() for row in _rows(section) for f in row]
    components: list[Any] = []
    with gr.Row():
        with gr.Column(scale=3):
            for number, (section, section_fields) in enumerate(sections.items()):
                with gr.Accordion(section, open=number < 2, elem_id=f"train-section-{section.lower()}"):
                    for row in _rows(section_fields):
                        with gr.Row():
                            components += [_field_component(f) for f in row]
            processes = gr.Number(
                1, precision=0, label="processes", elem_id="train-processes",
                info="More than 1 launches the DeepSpeed launcher (`deepspeed --num_gpus N --module vidlora.train`).",
            )  # fmt: skip
            extra = gr.Textbox(
                label="more arguments", elem_id="train-extra",
                info="Any other `vidlora train` flags; a flag given here replaces the form's value.",
            )  # fmt: skip
        with gr.Column(scale=2):
            command = gr.Textbox(
                label="command",
                elem_id="train-command",
                lines=6,
                max_lines=12,
                buttons=["copy"],
                interactive=False,
            )
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="train-start")
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume = gr.Button("Resume", elem_id="train-resume")
            status = gr.Markdown("no job yet", elem_id="train-status")
            loss = gr.Image(label="train loss", elem_id="train-loss", type="pil", height=280)
            log = gr.Code(
                label="log (last lines)", lines=12, max_lines=12, elem_id="train-log", wrap_lines=True
            )
    output_dir = components[[f.name for f in fields].index("output_dir")]
    plots = Path(tempfile.mkdtemp(prefix="vidlora-webui-"))
    shown: dict[str, Any] = {}

    def words(*values: Any) -> list[str]:
        *form, count, more = values
        return launch_words(flags_from_form(fields, form, more), int(count or 1))

    @_shown_errors
    def preview(*values: Any) -> str:
        import shlex

        return shlex.join(words(*values))

    @_shown_errors
    def launch(*values: Any) -> tuple[str, str]:
        job = jobs.launch(words(*values))
        return job.command, job.output_dir

    @_shown_errors
    def stop_job(directory: str) -> str:
        job = jobs.find(_resolved(directory))
        return f"sent SIGTERM to pid {job.pid}" if job is not None and job.stop() else "no running job there"

    @_shown_errors
    def resume_job(directory: str) -> str:
        return jobs.resume(_resolved(directory)).command

    def refresh(directory: str) -> tuple[Any, Any, Any]:
        job = jobs.find(_resolved(directory)) if directory else None
        if job is None:
            return "no job in this output dir", gr.update(), ""
        points = job.loss_points()
        text = f"**{job.state()}** · pid {job.pid}"
        if points:
            text += f" · step {points[-1][0]} · loss {points[-1][1]:.4f}"
        key = job.output_dir
        image: Any = gr.update()
        if points and shown.get(key) != points:
            name = hashlib.sha1(key.encode()).hexdigest()[:12] + ".png"
            path = plot_points(points, plots / name)
            if path is not None:
                from PIL import Image

                with Image.open(path) as opened:
                    image = opened.copy()
                shown[key] = points
        return text, image, job.log_tail(12)

    inputs = [*components, processes, extra]
    gr.on([c.change for c in inputs], preview, inputs, command)
    start.click(launch, inputs, [command, output_dir])
    stop.click(stop_job, output_dir, status)
    resume.click(resume_job, output_dir, command)
    gr.Timer(1.0).tick(refresh, output_dir, [status, loss, log])

    def restore(*values: Any) -> list[Any]:
        # A refreshed page starts from the seed's form; the job of the web UI's last launch is found
        # again from its output dir, and the form shows the command it runs.
        job = jobs.find(jobs.last_output_dir) if jobs.last_output_dir else None
        if job is None:
            return [*values, preview(*values)]
        flags, count = split_launch(job.words)
        form, more = form_from_flags(fields, flags)
        return [*form, count, more, job.command]

    return inputs, command, restore


def _resolved(directory: str) -> Path:
    return Path(directory.strip()).expanduser().resolve()


def _data_tab(default_model: str) -> None:
    import gradio as gr

    with gr.Row():
        model = gr.Textbox(default_model, label="--model_name_or_path", elem_id="data-model")
        data_path = gr.Textbox(label="--data_path", elem_id="data-path", placeholder="train.json [more.json]")
        video_folder = gr.Textbox(label="--video_folder", elem_id="data-video-folder")
        image_folder = gr.Textbox(label="--image_folder", elem_id="data-image-folder")
    check = gr.Button("Check", variant="primary", elem_id="data-check")
    report = gr.Code(label="vidlora check", elem_id="data-report", lines=12, max_lines=24)
    with gr.Row():
        sample_id = gr.Dropdown([], label="sample id", elem_id="data-sample", allow_custom_value=True)
        show = gr.Button("Show sample", elem_id="data-show")
    summary = gr.Markdown(elem_id="data-summary")
    with gr.Row():
        frames = gr.Gallery(
            label="sampled frames (as the tower gets them)", columns=8, height=150, elem_id="data-frames",
            object_fit="contain", scale=3,
        )  # fmt: skip
        images = gr.Gallery(
            label="images (as the tower gets them)", columns=2, height=150, elem_id="data-images",
            object_fit="contain", scale=1,
        )  # fmt: skip
    tokens = gr.HighlightedText(
        label="prompt tokens (highlighted: trained)", elem_id="data-tokens", combine_adjacent=False,
        color_map={TRAINED: "green", MEDIA: "blue"}, show_legend=True,
    )  # fmt: skip

    @_shown_errors
    def run(model_, data_, video_, image_) -> tuple[str, Any]:
        text, ids, _ = run_data_check(check_argv(model_, data_, video_, image_))
        return text, gr.update(choices=ids, value=ids[0] if ids else None)

    @_shown_errors
    def view(model_, data_, video_, image_, chosen) -> tuple[str, list, list, list]:
        found = sample_view(check_argv(model_, data_, video_, image_), str(chosen))
        note = f"{found.num_tokens} tokens, {found.num_trained} trained"
        if found.problems:
            note += "\n\n" + "\n".join(f"- {p}" for p in found.problems)
        return note, found.frames, found.images, found.segments

    fields = [model, data_path, video_folder, image_folder]
    check.click(run, fields, [report, sample_id])
    show.click(view, [*fields, sample_id], [summary, frames, images, tokens])


def build_app(
    models: Any, *, jobs: Jobs | None = None, data_model: str = "tiny", cuda_available: bool = False
):
    """The web UI's ``gr.Blocks`` (not launched): Chat over ``models`` (a ModelSet, or None), Train
    with ``jobs``, Data reading samples with ``data_model``'s processor."""
    import gradio as gr

    jobs = jobs or Jobs()
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown("## vidlora — chat, train and check data")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                _chat_tab(models)
            with gr.Tab("Train", id="train"):
                inputs, command, restore = _train_tab(jobs, cuda_available)
            with gr.Tab("Data", id="data"):
                _data_tab(data_model)

        app.load(restore, inputs, [*inputs, command])
    return app


def theme() -> Any:
    """Gradio's default look with the system's fonts (the page loads nothing from the internet)."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
