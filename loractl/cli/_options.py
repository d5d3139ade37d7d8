"""Options shared by every command."""

from __future__ import annotations

import typer

JSON = typer.Option(
    False, "--json", help="Print one JSON document (schema_version 1) on stdout and nothing else."
)
QUIET = typer.Option(False, "-q", "--quiet", help="Print nothing but errors.")
FORCE = typer.Option(False, "--force", help="Replace the output if it exists (never an input).")
#: the adapter formats (loractl.formats.FORMATS, without importing the library for --help)
FORMATS = ("peft", "kohya", "diffusers", "loralib", "gguf")
FORMAT_CHOICES = "|".join(FORMATS)


def _complete_format(incomplete: str) -> list[str]:
    return [f for f in FORMATS if f.startswith(incomplete)]


FORMAT = typer.Option(
    None,
    "--format",
    help="Adapter format instead of detecting it.",
    autocompletion=_complete_format,
)
ALLOW_PICKLE = typer.Option(
    False, "--allow-pickle", help="Accept .bin/.pt/.ckpt pickles (read with torch.load(weights_only=True))."
)
SUBFOLDER = typer.Option(
    None, "--subfolder", help="For a Hub adapter (org/name[@revision]): the folder inside the repo."
)
ALPHA = typer.Option(
    None,
    "--alpha",
    help="lora_alpha for adapters that do not state it (a PEFT adapter without adapter_config.json, loralib).",
)
