import hashlib

import pytest

from lmjax.files import file_sha256, write_atomically, write_json_atomically


def test_write_is_whole_or_nothing(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomically(path, {"step": 1})

    def fails(f):
        f.write(b'{"step": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fails)
    assert path.read_text() == '{\n  "step": 1\n}'  # the old file, untouched
    data = bytes(range(256)) * 70_000  # 17.9 MB: more than one 16 MiB read block
    write_atomically(path, lambda f: f.write(data))
    assert path.read_bytes() == data and file_sha256(path) == hashlib.sha256(data).hexdigest()
