"""Messages that optional packages print when they are merely imported, and that a vidlora user can
neither act on nor needs; :func:`quiet_imports` filters exactly these while such imports run.

* transformers imports PEFT whenever it is installed, and PEFT imports bitsandbytes whenever that is
  (``peft/helpers.py``), so every run imports bitsandbytes, ``--bits`` or not. On a CPU with
  AVX512-BF16 bitsandbytes then logs "Failed to load CPU gemm_4bit_forward from kernels-community"
  (a kernel for 4-bit matmuls on a CPU, fetched from the hub by the ``kernels`` package), and its
  ``torch.compile`` decorators import torch's inductor, whose ``torch.utils.mkldnn`` calls the
  deprecated ``torch.jit.script_method`` (a DeprecationWarning inside torch).
* accelerate imports DeepSpeed's optimizers whenever DeepSpeed is installed, and on a machine
  without a GPU DeepSpeed then prints "Setting accelerator to CPU" to stdout.

None of these imports can be avoided without patching those packages.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

#: (logger name, a substring of the message) that the imports log.
IMPORT_LOG_MESSAGES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator"),
)
#: (category, the start of the message) of the warnings the imports raise.
IMPORT_WARNINGS = ((DeprecationWarning, "`torch.jit.script_method` is deprecated"),)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Run imports of transformers' Trainer, PEFT or accelerate without the messages listed above;
    every other message, and these outside the block, go through unchanged."""
    with ExitStack() as stack, warnings.catch_warnings():
        for category, start in IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(start), category=category)
        for name, text in IMPORT_LOG_MESSAGES:
            logger, drop = logging.getLogger(name), _DropMessage(text)
            logger.addFilter(drop)
            stack.callback(logger.removeFilter, drop)
        yield
