"""File names made from input ids never leave their folder, never collide, never get too long."""
from pathlib import Path

import pytest

from diffold.paths import inside, safe_filename

HOSTILE = ["../../../../tmp/evil", "/etc/passwd", "..", ".", "", "a/b", "a\\b", "x" * 300, "ok\x00nul",
           ".hidden", "名前", "a b", "../" * 40 + "escape", "CON", "a\nb"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_ids_stay_one_component_inside_the_folder(tmp_path: Path, name: str):
    out = safe_filename(name, ".pdb")
    assert "/" not in out and "\\" not in out and "\x00" not in out and not out.startswith(".")
    assert len(out.encode()) < 255  # a file system's name limit
    target = tmp_path / out
    assert inside(tmp_path, target)
    target.write_text("x")  # really creatable
    assert target.parent == tmp_path


def test_safe_names_unchanged_and_distinct_ids_stay_distinct():
    assert safe_filename("1ehz_A", ".pdb") == "1ehz_A.pdb"
    assert safe_filename("5k7c_A_sample0") == "5k7c_A_sample0"
    names = {safe_filename(n) for n in ["a/b", "a_b", "a b", "a\\b", "x" * 300, "x" * 301]}
    assert len(names) == 6


def test_inside_rejects_escapes(tmp_path: Path):
    assert not inside(tmp_path / "run", tmp_path / "run" / ".." / "elsewhere")
    assert inside(tmp_path / "run", tmp_path / "run" / "samples" / "a.pdb")
