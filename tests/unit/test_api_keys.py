"""Who may call (``gateway/auth.py``): the API key file, the key ring and the per-client token buckets."""

from __future__ import annotations

import hashlib

import pytest

from inferencehub.gateway.auth import ADMIN_PATH, Key, KeyFileError, KeyRing, TokenBuckets, parse_keys, read_keys

SECRET = "s3cret-key"
DIGEST = hashlib.sha256(SECRET.encode()).digest()


def test_a_plain_key_is_stored_as_its_digest_with_a_default_name():
    [key] = parse_keys(SECRET)
    assert key == Key(DIGEST, f"key-{DIGEST.hex()[:8]}", "user")


def test_a_hashed_key_a_name_and_a_role():
    text = f"""
    # the team's keys
    sha256:{DIGEST.hex().upper()}   ci robot

    other   ops admin
    third   admin
    fourth  not an admin user
    """
    keys = parse_keys(text)
    assert [(k.name, k.role) for k in keys] == [
        ("ci robot", "user"),
        ("ops", "admin"),
        ("admin", "user"),  # a role comes after a name: a lone word is the name
        ("not an admin", "user"),
    ]
    assert keys[0].digest == DIGEST


def test_a_bad_hash_names_the_line_never_the_key():
    with pytest.raises(KeyFileError) as caught:
        parse_keys(f"{SECRET} one\nsha256:abc two\n", "keys.txt")
    assert str(caught.value) == "keys.txt, line 2: sha256: must be followed by 64 hex digits"
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_a_file_without_keys_is_refused(text):
    with pytest.raises(KeyFileError, match="the API key file holds no key"):
        parse_keys(text)


def test_an_unreadable_file_is_named(tmp_path):
    with pytest.raises(KeyFileError, match=r"cannot read the API key file .*missing: No such file or directory"):
        read_keys(tmp_path / "missing")


def test_the_key_ring_finds_a_presented_key_and_rereads_its_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"{SECRET} alice admin\n")
    ring = KeyRing(path, interval=0.0)
    assert ring.key_of(SECRET) == Key(DIGEST, "alice", "admin")
    assert ring.name_of("wrong") is None
    path.write_text("new-key bob\n# a longer file, so its size changes too\n")
    assert ring.name_of("new-key") == "bob"
    assert ring.name_of(SECRET) is None
    path.write_text("sha256:nothex\n")  # a file that no longer parses keeps the keys in use
    assert ring.name_of("new-key") == "bob"


def test_admin_actions_are_model_load_and_unload():
    assert ADMIN_PATH.match("/v2/repository/models/iris/load").groups() == ("iris", "load")
    assert ADMIN_PATH.match("/v2/repository/models/iris/unload").groups() == ("iris", "unload")
    assert ADMIN_PATH.match("/v2/repository/index") is None
    assert ADMIN_PATH.match("/v2/repository/models/a/b/load") is None


def test_a_bucket_allows_its_burst_then_says_how_long_to_wait():
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("a", now=10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", now=10.0) == pytest.approx(0.5)
    assert buckets.take("a", now=10.5) == 0.0  # one token back after 1/rate seconds
    assert buckets.take("b", now=10.5) == 0.0  # clients have buckets of their own


def test_tokens_never_pile_up_beyond_the_burst():
    buckets = TokenBuckets(rate=1.0, burst=2)
    buckets.take("a", now=0.0)
    assert [buckets.take("a", now=1000.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_the_default_burst_is_one_seconds_worth():
    assert TokenBuckets(rate=2.5, burst=0).burst == 3.0
    assert TokenBuckets(rate=0.1, burst=0).burst == 1.0


def test_the_least_recently_seen_clients_are_forgotten_first():
    buckets = TokenBuckets(rate=1.0, burst=1, max_clients=2)
    buckets.take("a", now=0.0)
    buckets.take("b", now=0.0)
    buckets.take("a", now=0.0)  # a seen again: b is now the oldest
    buckets.take("c", now=0.0)
    assert list(buckets.buckets) == ["a", "c"]
    assert buckets.take("b", now=0.0) == 0.0  # forgotten, so it starts with a full bucket
