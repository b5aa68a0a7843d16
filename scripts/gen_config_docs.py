"""Regenerates docs/configuration.md from the pydantic models in libs/alignd/config/.

Run: python scripts/gen_config_docs.py
"""

from pathlib import Path

from alignd.config import reference_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    out.write_text(reference_markdown())
    print(out)
