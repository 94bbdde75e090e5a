"""`vidlora chat`: talk about a video and/or images with any checkpoint, answers streamed.

    vidlora chat --model_path out/checkpoint-50 --file clip.mp4 [--file photo.jpg]

The first message gets the media placeholders (`<video>` first, then one `<image>` per image),
as in the training data; the conversation is kept, so follow-up questions see earlier answers.
An empty line or EOF ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from vidlora.data.records import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Turn
from vidlora.errors import NotFoundError, UsageError
from vidlora.infer.device import AUTO, DEVICE_HELP, DTYPE_HELP

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def split_files(files: Iterable[str]) -> tuple[Path | None, list[Path]]:
    """One video at most and any number of images, told apart by extension."""
    video: Path | None = None
    images: list[Path] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise NotFoundError(f"--file {name}: no such file")
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            if video is not None:
                raise UsageError(f"--file {name}: one video per chat (already have {video})")
            video = path
        elif suffix in IMAGE_SUFFIXES:
            images.append(path)
        else:
            raise UsageError(
                f"--file {name}: unknown extension {suffix!r} (video: {sorted(VIDEO_SUFFIXES)}, "
                f"image: {sorted(IMAGE_SUFFIXES)})"
            )
    return video, images


def first_message(text: str, video: Path | None, images: list[Path]) -> str:
    placeholders = ([VIDEO_PLACEHOLDER] if video else []) + [IMAGE_PLACEHOLDER] * len(images)
    return "\n".join([*placeholders, text]) if placeholders else text


def chat_loop(
    generator,
    video: Path | None,
    images: list[Path],
    read: Callable[[], str | None],
    write: Callable[[str], None],
    *,
    max_new_tokens: int,
    temperature: float,
    stream: bool = False,
) -> list[Turn]:
    """Run a conversation; ``read`` returns the next user line (None/empty ends it). With
    ``stream``, answers reach ``write`` piece by piece as they are generated."""
    from vidlora.infer.generate import Request

    turns: list[Turn] = []
    while True:
        text = read()
        if not text:
            return turns
        value = first_message(text, video, images) if not turns else text
        turns.append(Turn("human", value))
        answer = generator.generate(
            [Request("chat", list(turns), video, images)],
            max_new_tokens=max_new_tokens, temperature=temperature,
            on_text=(lambda _row, piece: write(piece)) if stream else None,
        )[0]  # fmt: skip
        write("\n" if stream else answer + "\n")
        turns.append(Turn("gpt", answer))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidlora chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--model_base", default=None)
    parser.add_argument("--file", action="append", default=[], help="a video or image (repeatable)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument(
        "--cache_dir", default=None, help="hub cache for the base model (default: the recorded one)"
    )
    parser.add_argument("--device", default=AUTO, help=DEVICE_HELP)
    parser.add_argument("--dtype", default=AUTO, help=DTYPE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vidlora.infer.generate import Generator
    from vidlora.infer.load import load_for_inference_on

    args = build_parser().parse_args(argv)
    video, images = split_files(args.file)
    loaded = load_for_inference_on(
        args.model_path, args.model_base, device=args.device, dtype=args.dtype, cache_dir=args.cache_dir
    )
    print(
        f"vidlora chat: {loaded.description}; template {loaded.processor.template}. Empty line to quit.",
        file=sys.stderr,
    )
    generator = Generator(loaded)

    def read() -> str | None:
        try:
            return input("USER: ").strip()
        except EOFError:
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(
        generator,
        video,
        images,
        read,
        write,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        stream=True,
    )
    return 0
