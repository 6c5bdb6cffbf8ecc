"""`facelink edge --config`: one file for several cameras, YAML or JSON, checked before anything opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from facelink.cli_edge import load_cameras_file

YAML = """\
# the door and the hall
cameras:
  - source: rtsp://door.local/stream
    camera_id: door-1
  - source: "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! appsink"
    camera_id: hall
    stride: 2
"""


def test_a_yaml_file_names_each_camera(tmp_path: Path) -> None:
    path = tmp_path / "cameras.yaml"
    path.write_text(YAML)
    cameras = load_cameras_file(path).cameras
    assert [c.camera_id for c in cameras] == ["door-1", "hall"]
    assert cameras[1].stride == 2 and cameras[1].source.startswith("nvarguscamerasrc")


def test_a_json_file_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "cameras.json"
    path.write_text('{"cameras": [{"source": "0", "camera_id": "desk"}]}')
    assert load_cameras_file(path).cameras[0].camera_id == "desk"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "cameras: [source: 0", "not valid YAML"),
        ("dup.yaml", "cameras:\n  - {source: '0', camera_id: a}\n  - {source: '1', camera_id: a}\n", "unique"),
        ("none.json", '{"cameras": []}', "cameras"),
    ],
)
def test_a_bad_file_says_what_is_wrong(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_cameras_file(path)
