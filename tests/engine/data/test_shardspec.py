"""Shard spec resolution: every accepted form, and one-line UserErrors for the bad ones."""

import json

import pytest

from engine.data.shardspec import resolve_shards
from engine.errors import UserError


def test_directory_manifest_glob_brace_and_list(shard_dir, tmp_path):
    root = shard_dir(per_shard=[3, 2, 4], n_shards=3)
    by_dir = resolve_shards(str(root))
    assert [u.rsplit("/", 1)[-1] for u in by_dir.urls] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert by_dir.counts == [3, 2, 4] and by_dir.total_samples == 9
    assert resolve_shards(str(root / "manifest.json")).urls == by_dir.urls
    glob = resolve_shards(f"{root}/shard-*.tar")
    assert glob.urls == by_dir.urls and glob.counts == [3, 2, 4]  # manifest found beside the shards
    brace = resolve_shards(f"{root}/shard-{{000001..000002}}.tar")
    assert brace.urls == by_dir.urls[1:] and brace.counts == [2, 4]
    lst = tmp_path / "list.txt"
    lst.write_text("# two shards\nds/shard-000002.tar\n\nds/shard-000000.tar\n")
    assert resolve_shards(str(lst)).urls == [by_dir.urls[2], by_dir.urls[0]]
    both = resolve_shards(f"{by_dir.urls[0]}::{by_dir.urls[1]}")
    assert both.urls == by_dir.urls[:2]
    assert resolve_shards([by_dir.urls[2]]).counts == [4]


def test_remote_urls_are_not_checked_and_use_given_manifest(shard_dir):
    root = shard_dir(per_shard=2, n_shards=2)
    ss = resolve_shards("pipe:cat " + str(root) + "/shard-{000000..000001}.tar", manifest=str(root / "manifest.json"))
    assert ss.urls[0] == f"pipe:cat {root}/shard-000000.tar"
    assert ss.counts == [2, 2] and ss.manifest["num_bands"] == 3
    assert resolve_shards("https://example.org/shard-000000.tar").counts == [None]


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("", "empty shard spec"),
        ("/nonexistent/dir", "no such file or directory"),
        ("/nonexistent/shard-*.tar", "matched no files"),
    ],
)
def test_bad_specs(spec, needle):
    with pytest.raises(UserError, match=needle):
        resolve_shards(spec)


def test_bad_directory_and_manifest(shard_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no manifest.json"):
        resolve_shards(str(empty))
    root = shard_dir(per_shard=2, n_shards=2)
    with pytest.raises(UserError, match=r"shard-000002.tar' does not exist \(and 3 more\)"):
        resolve_shards(f"{root}/shard-{{000000..000005}}.tar")
    m = json.loads((root / "manifest.json").read_text())
    m["format"] = "something-else"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="is not 'geoexplora-shards/1'"):
        resolve_shards(str(root))
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        resolve_shards(str(root))
