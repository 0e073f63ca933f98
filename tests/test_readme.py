"""The README states the defaults the code uses: the preset table is generated from PRESETS."""

from pathlib import Path

from advantage.core.presets import preset_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_preset_table_matches_code():
    text = README.read_text()
    for line in preset_table().splitlines():
        assert line in text, (
            f"README preset table is stale; run `advantage presets`. Missing:\n{line}"
        )


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
