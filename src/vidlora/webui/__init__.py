"""`vidlora webui`: chat with what you trained, launch and follow training, check data — in a browser.

    vidlora webui --model_path out/checkpoint-50 [--adapters other=out2/checkpoint-20] [--port 7860]

Three tabs (Gradio, ``pip install 'vidlora[webui]'``): Chat streams answers from the one generation
path and shows the frames the model sees; Train runs the seed's `vidlora train` command from a form
and follows its loss and log, a job that outlives the page; Data runs `vidlora check` and shows
one sample's frames and trained tokens. Gradio is imported only by this command.
"""

from __future__ import annotations

import argparse
import sys

from vidlora.errors import UsageError
from vidlora.infer.adapters import add_model_set_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidlora webui", description=__doc__.split("\n\n")[0])
    add_model_set_arguments(parser, required=False)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web UI needs Gradio: pip install 'vidlora[webui]'") from None
    import torch

    from vidlora.infer.adapters import load_model_set, parse_adapters
    from vidlora.webui.app import build_app, theme

    adapters = parse_adapters(args.adapters)
    models = None
    if args.model_path is not None or adapters:
        if args.model_path is None:
            raise UsageError("--adapters needs --model_path (the model they were trained on, or one of them)")
        models = load_model_set(args)
        print(f"vidlora webui: serving {', '.join(models.names)}", file=sys.stderr)
    app = build_app(models, data_model=args.model_path or "tiny", cuda_available=torch.cuda.is_available())
    app.queue().launch(
        server_name=args.host, server_port=args.port, theme=theme(), show_error=True, quiet=False
    )
    return 0
