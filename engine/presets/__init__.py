"""The YAML presets shipped inside the package (this folder), found by name or by path.

``--config explora_dinov2_vitl14_fmow_rgb`` (or ``explora_dinov2_vitl14_fmow_rgb.yaml``) names a
preset of this folder; any other value is a path to a YAML file. An existing file always wins, so a
local ``tiny_cpu.yaml`` is read instead of the shipped one.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    """Names of the shipped presets (file stems), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(name_or_path: str) -> Path:
    """The YAML file ``--config`` means: an existing file, else a shipped preset of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"--config: '{name_or_path}' is a directory; give a YAML file or a preset name")
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if "/" not in stem and (PRESET_DIR / f"{stem}.yaml").is_file():
        return PRESET_DIR / f"{stem}.yaml"
    raise UserError(
        f"--config: '{name_or_path}' is neither a YAML file nor a preset; presets: {', '.join(preset_names())}"
    )
