"""The one check of an output folder that every writing stage shares."""

from __future__ import annotations

import pytest

from speechxfer.errors import InputError, output_folder


def test_an_output_folder_is_created_or_refused_with_one_wording(tmp_path):
    assert output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert output_folder(tmp_path / "a") == tmp_path / "a"  # already there: kept as it is
    assert not output_folder(tmp_path / "later", create=False).exists()
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for create in (True, False):
        with pytest.raises(InputError) as caught:
            output_folder(taken, create=create)
        assert str(caught.value) == f"{taken}: the output folder is a file"
    with pytest.raises(InputError) as caught:
        output_folder(taken / "inside")
    assert str(caught.value) == f"{taken / 'inside'}: cannot create the output folder: Not a directory"
    assert taken.read_text() == "mine"
