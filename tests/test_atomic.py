import os

import pytest

from speechxfer.atomic import atomic_write


def test_a_write_that_cannot_happen_names_the_file_asked_for_and_leaves_nothing(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        with atomic_write(tmp_path / "folder") as f:
            f.write("text")
    assert caught.value.filename == str(tmp_path / "folder") and caught.value.strerror == "Is a directory"
    with pytest.raises(FileNotFoundError) as caught:
        with atomic_write(tmp_path / "absent" / "out.txt", binary=True) as f:
            f.write(b"bytes")
    assert caught.value.filename == str(tmp_path / "absent" / "out.txt")
    assert os.listdir(tmp_path) == ["folder"] and not os.listdir(tmp_path / "folder")

    with atomic_write(tmp_path / "out.txt") as f:
        f.write("text")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "text"
    assert sorted(os.listdir(tmp_path)) == ["folder", "out.txt"]
