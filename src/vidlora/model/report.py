"""What a load did with every tensor: placed, knowingly ignored, or a problem (for people and for code)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from vidlora.errors import VidloraError
from vidlora.model import keymaps

_PREVIEW = 5


class CheckpointLoadError(VidloraError, ValueError):
    """A checkpoint did not load cleanly; `report` says exactly what is wrong."""

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        self.report = report
        super().__init__(message if report is None else f"{message}\n{report.format()}")


@dataclass
class SourceReport:
    """What happened to the tensors of one checkpoint file."""

    path: str
    layout: str
    tensors: int = 0
    loaded: int = 0
    ignored: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """Everything a load did, for people (`format`) and for code (the fields).

    Attributes:
        layout: detected layout (``preset``, ``original``, ``hf``, ``llm``, ``ours``).
        source: the resolved directory (or preset name).
        sources: per-file accounting; every tensor of every file is loaded, ignored or unexpected.
        missing: our keys that no checkpoint provided.
        mismatched: (our key, shape in checkpoint, shape in model, file).
        unexpected: (source key, our key or None, file): weights that would be dropped.
        initialised: our keys initialised fresh by design (a projector with no adapter file).
        temporal_attention: whether the video tower has LanguageBind's temporal layers.
        notes: decisions worth knowing (tokens added, embeddings resized, defaults applied).
    """

    layout: str
    source: str
    sources: list[SourceReport] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...], str]] = field(default_factory=list)
    unexpected: list[tuple[str, str | None, str]] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    temporal_attention: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing, shape-mismatched or unexpected weights."""
        return not (self.missing or self.mismatched or self.unexpected)

    @property
    def ignored(self) -> dict[str, str]:
        """Source key -> reason, over all files."""
        return {key: reason for src in self.sources for key, reason in src.ignored.items()}

    def format(self) -> str:
        """A readable summary: counts per part, the first few names of each problem."""
        lines = [f"load report: layout {self.layout!r} from {self.source}"]
        for src in self.sources:
            lines.append(
                f"  {src.path} [{src.layout}]: {src.tensors} tensors, {src.loaded} loaded, "
                f"{len(src.ignored)} ignored, {len(src.unexpected)} unexpected"
            )
        lines += _grouped("missing", self.missing)
        if self.mismatched:
            lines.append(f"  shape mismatch ({len(self.mismatched)}):")
            for key, got, want, path in self.mismatched[:_PREVIEW]:
                lines.append(f"    {key}: checkpoint {list(got)} vs model {list(want)} ({path})")
            if len(self.mismatched) > _PREVIEW:
                lines.append(f"    ... and {len(self.mismatched) - _PREVIEW} more")
        if self.unexpected:
            lines += _grouped(
                "unexpected",
                [f"{src_key} -> {ours}" if ours else src_key for src_key, ours, _ in self.unexpected],
                parts=[keymaps.part_of(ours) if ours else "unmapped" for _, ours, _ in self.unexpected],
            )
        lines += _grouped("initialised fresh", self.initialised)
        ignored = Counter(reason for src in self.sources for reason in src.ignored.values())
        if ignored:
            lines.append(
                f"  ignored ({sum(ignored.values())}): " + "; ".join(f"{n} x {r}" for r, n in ignored.items())
            )
        if self.temporal_attention is not None:
            lines.append(
                f"  temporal attention in the video tower: {'yes' if self.temporal_attention else 'ABSENT'}"
            )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _grouped(title: str, keys: list[str], parts: list[str] | None = None) -> list[str]:
    if not keys:
        return []
    groups: dict[str, list[str]] = defaultdict(list)
    for key, part in zip(keys, parts or [keymaps.part_of(k) for k in keys], strict=True):
        groups[part].append(key)
    lines = [f"  {title} ({len(keys)}):"]
    for part, names in groups.items():
        more = f", ... (+{len(names) - _PREVIEW})" if len(names) > _PREVIEW else ""
        lines.append(f"    {part}: {len(names)} ({', '.join(names[:_PREVIEW])}{more})")
    return lines
